//! Two small jobs for scripts/build-guest-plugins.sh, without installing wasm-tools:
//!
//! - `componentize-rust CORE.wasm OUT.wasm` wraps a core module whose custom sections
//!   carry the component type (wit-bindgen puts them there) as a component, like
//!   `wasm-tools component new`, with the same encoder gateway/build.rs uses.
//! - `componentize-rust --imports COMPONENT.wasm` prints the component's top-level
//!   imports, one per line (to check that a plugin imports no WASI).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, file] if flag == "--imports" => imports(file),
        [input, output] if !input.starts_with('-') => wrap(input, output),
        _ => {
            eprintln!("usage: componentize-rust CORE.wasm OUT.wasm\n       componentize-rust --imports COMPONENT.wasm");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("componentize-rust: {e}");
            ExitCode::FAILURE
        }
    }
}

fn wrap(input: &str, output: &str) -> Result<(), String> {
    let module = std::fs::read(input).map_err(|e| format!("read {input}: {e}"))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("wrap {input} as a component: {e:#}"))?;
    std::fs::write(output, &component).map_err(|e| format!("write {output}: {e}"))?;
    println!("{output}: {} bytes (core module {} bytes)", component.len(), module.len());
    Ok(())
}

fn imports(file: &str) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("read {file}: {e}"))?;
    // Nested modules and components come inline between their section and their `End`.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(&bytes) {
        match payload.map_err(|e| format!("{file}: {e}"))? {
            wasmparser::Payload::Version { encoding: wasmparser::Encoding::Module, .. } if depth == 0 => {
                return Err(format!("{file} is a core module, not a component"));
            }
            wasmparser::Payload::ModuleSection { .. } | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    println!("{}", import.map_err(|e| format!("{file}: {e}"))?.name.name);
                }
            }
            _ => {}
        }
    }
    Ok(())
}
