//! Makes built binaries find libtorch on their own, and builds the small C++
//! shim for GPU staging (`csrc/cuda_stage.cpp`) against libtorch's headers.
//!
//! `torch-sys` tells us (through `links = "tch"`) where libtorch's shared
//! libraries are. Without an rpath every binary would need `LD_LIBRARY_PATH`,
//! and the linker's `--as-needed` would drop `libtorch_cuda` (nothing references
//! it by symbol), leaving CUDA unusable even on a GPU machine.
//!
//! Those link arguments apply to this package's binaries only. A crate that
//! depends on modelio needs the same for its own and cannot see torch-sys's
//! variable (only direct dependents of torch-sys can), so the folder is passed
//! on as `DEP_MODELIO_LIBTORCH_LIB` (through `links = "modelio"`); see the
//! README, "Using modelio from your own crate".
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/cuda_stage.cpp");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    println!("cargo:libtorch_lib={}", lib.display());
    // The wheel's layout: torch/lib next to torch/include.
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_else(|| lib.join("../include"));
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/cuda_stage.cpp")
        .compile("modelio_cuda_stage");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
