//! Publishing a discovery change: a source hands over the whole set of 1,000 instances
//! and the pool writer turns it into a new snapshot (entries kept by id, a changed weight
//! taken, a joining instance pending, a leaving one dropped). Target: ≤ 10 ms.
//!
//! `cargo bench -p gateway --bench discovery`

use criterion::{Criterion, criterion_group, criterion_main};
use gateway::discovery::{Instance, publish_to};
use gateway::pool::{Pool, Source};
use std::net::SocketAddr;

fn set(n: u16, weight_of_first: u32, extra: Option<u16>) -> Vec<Instance> {
    (0..n)
        .chain(extra)
        .map(|i| Instance {
            id: format!("books-{i:05}"),
            addr: SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080)),
            weight: if i == 0 { weight_of_first } else { 1 },
            zone: ["eu", "us"][usize::from(i % 2)].to_owned(),
            labels: vec![("version".to_owned(), "2".to_owned())],
        })
        .collect()
}

fn publish(c: &mut Criterion) {
    let pool = Pool::new(Vec::new());
    let mut group = c.benchmark_group("publish 1000 backends");
    // Every iteration publishes a real change: the sets alternate.
    let (a, b) = (set(1000, 1, None), set(1000, 2, None));
    publish_to(&pool, true, Source::Registry, &a).expect("the first set joins");
    let mut flip = false;
    group.bench_function("a weight changes", |bench| {
        bench.iter(|| {
            flip = !flip;
            publish_to(&pool, true, Source::Registry, if flip { &b } else { &a }).expect("a change")
        })
    });
    let (c1, c2) = (set(1000, 1, None), set(999, 1, Some(1000)));
    // Whatever the first group left, the pool is at `c1` now and the next publish is `c2`.
    publish_to(&pool, true, Source::Registry, &c1);
    flip = false;
    group.bench_function("one joins, one leaves", |bench| {
        bench.iter(|| {
            flip = !flip;
            publish_to(&pool, true, Source::Registry, if flip { &c2 } else { &c1 }).expect("a change")
        })
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
