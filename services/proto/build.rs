//! Compiles `proto/` with a vendored `protoc`, so a fresh machine needs no hand-installed compiler.
//! `madsim-tonic-build` emits both the real tonic code and the simulator's twin; `--cfg madsim` picks.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../../proto");
    let protos = [
        root.join("payment/v1/payment.proto"),
        root.join("account/v1/account.proto"),
        root.join("notification/v1/notification.proto"),
        root.join("events/v1/events.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_build::configure().compile_protos_with_config(config, &protos, &[root, well_known])?;
    Ok(())
}
