//! twtrace's kernel programs. They exist for the BPF target only: twtrace's build script
//! compiles this crate with bpf-linker; on the host this binary is an empty stub so that
//! workspace-wide builds and lints work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("twtrace-ebpf holds kernel programs for the BPF target; run twtrace instead");
}
