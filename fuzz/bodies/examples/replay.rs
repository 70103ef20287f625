//! Runs one target's body on input files, e.g. a crash libFuzzer saved:
//! `cargo run -p tenantsync-fuzz-bodies --example replay -- rewrite fuzz/artifacts/rewrite/crash-...`.
//! A failing property panics with its message, as under the fuzzer.

use tenantsync_fuzz_bodies::TARGETS;

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let Some((_, body)) = TARGETS.iter().find(|(n, _)| *n == target) else {
        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: replay <target> <file>...; targets: {}",
            names.join(", ")
        );
        std::process::exit(2);
    };
    for file in args {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        body(&data);
        println!("{file}: ok");
    }
}
