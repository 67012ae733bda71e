//! Declares `--cfg madsim` (set by the `cargo sim` alias) so `#[cfg(madsim)]` is not an unknown cfg.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(madsim)");
}
