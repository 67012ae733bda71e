//! Compiles the simulation-only `proto/ledger_node.proto` with the vendored `protoc`, through
//! `madsim-tonic-build` (as `services/proto` does), so it runs over madsim-tonic under `--cfg madsim`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("proto");
    // `cfg(madsim)` is set by the `cargo sim` alias, not by Cargo: declare it.
    println!("cargo::rustc-check-cfg=cfg(madsim)");
    let proto = root.join("ledger_node.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure().compile_protos_with_config(config, &[proto], &[root])?;
    Ok(())
}
