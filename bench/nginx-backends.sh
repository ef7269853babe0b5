# Sourced by the bench scripts: `nginx_backends_conf DIR PORT...` writes DIR/backends.conf,
# one nginx (one worker, keep-alive on, no logging) with a server per PORT answering
# `backend-N` (N = 1, 2, ...), and prints its path.
nginx_backends_conf() {
  local dir="$1" n=0 servers=""
  shift
  for port in "$@"; do
    n=$((n + 1))
    servers+="  server { listen 127.0.0.1:$port; return 200 \"backend-$n\\n\"; }"$'\n'
  done
  cat >"$dir/backends.conf" <<EOF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
$servers}
EOF
  echo "$dir/backends.conf"
}
