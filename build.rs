//! Makes built binaries find libtorch on their own.
//!
//! `torch-sys` tells us (through `links = "tch"`) where libtorch's shared
//! libraries are. Without an rpath every binary would need `LD_LIBRARY_PATH`,
//! and the linker's `--as-needed` would drop `libtorch_cuda` (nothing references
//! it by symbol), leaving CUDA unusable even on a GPU machine.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
