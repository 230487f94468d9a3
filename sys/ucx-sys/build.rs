//! Generates the UCP bindings from the system's UCX headers and links libucp and libucs.

use std::env;
use std::path::{Path, PathBuf};

/// The UCP calls kvtier makes; everything else in the headers stays out of the bindings.
const FUNCTIONS: &[&str] = &[
    "ucp_am_data_release",
    "ucp_am_recv_data_nbx",
    "ucp_am_send_nbx",
    "ucp_cleanup",
    "ucp_config_modify",
    "ucp_config_read",
    "ucp_config_release",
    "ucp_ep_close_nbx",
    "ucp_ep_create",
    "ucp_ep_flush_nbx",
    "ucp_ep_rkey_unpack",
    "ucp_get_nbx",
    "ucp_get_version",
    "ucp_get_version_string",
    "ucp_init_version",
    "ucp_mem_map",
    "ucp_mem_unmap",
    "ucp_put_nbx",
    "ucp_request_check_status",
    "ucp_request_free",
    "ucp_rkey_buffer_release",
    "ucp_rkey_destroy",
    "ucp_rkey_pack",
    "ucp_worker_arm",
    "ucp_worker_create",
    "ucp_worker_destroy",
    "ucp_worker_flush_nbx",
    "ucp_worker_get_address",
    "ucp_worker_get_efd",
    "ucp_worker_progress",
    "ucp_worker_query",
    "ucp_worker_release_address",
    "ucp_worker_set_am_recv_handler",
    "ucp_worker_signal",
    "ucs_status_string",
];

/// Enums whose values fill the parameter structs' field masks and flags (the structs
/// themselves come in through the functions that take them).
const ENUMS: &[&str] = &[
    "ucp_am_cb_flags",
    "ucp_am_handler_param_field",
    "ucp_am_recv_attr_t",
    "ucp_send_am_flags",
    "ucp_ep_close_flags_t",
    "ucp_ep_params_field",
    "ucp_err_handling_mode_t",
    "ucp_feature",
    "ucp_mem_map_params_field",
    "ucp_op_attr_t",
    "ucp_params_field",
    "ucp_worker_attr_field",
    "ucp_worker_params_field",
    "ucs_memory_type",
    "ucs_status_t",
    "ucs_thread_mode_t",
];

/// Macros with the API version `ucp_init` (a static inline function, so not in the library)
/// passes to `ucp_init_version`.
const VARS: &[&str] = &["UCP_API_MAJOR", "UCP_API_MINOR"];

const HEADER: &str = "ucp/api/ucp.h";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=UCX_INCLUDE_DIR");

    let mut include_dirs = Vec::new();
    if let Some(dir) = env::var_os("UCX_INCLUDE_DIR") {
        include_dirs.push(PathBuf::from(dir));
    }
    // pkg-config knows where a UCX installed outside /usr lives, and what it links against
    // (libucp needs libuct, libucs and libucm); distributions without ucx.pc get the two
    // libraries named directly.
    match pkg_config::Config::new().cargo_metadata(true).probe("ucx") {
        Ok(lib) => include_dirs.extend(lib.include_paths),
        Err(e) => {
            println!("cargo:warning=pkg-config found no ucx.pc ({e}); linking -lucp -lucs");
            println!("cargo:rustc-link-lib=ucp");
            println!("cargo:rustc-link-lib=ucs");
        }
    }
    include_dirs.push(PathBuf::from("/usr/include"));
    let Some(header) = include_dirs.iter().map(|d| d.join(HEADER)).find(|h| h.is_file()) else {
        panic!(
            "UCX's header {HEADER} was not found (looked in {}). Install the UCX development files: \
             `apt-get install libucx-dev` on Debian and Ubuntu (`ucx-devel` on Fedora/RHEL), or \
             set UCX_INCLUDE_DIR to the directory that holds ucp/api/ucp.h.",
            include_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    println!("cargo:rerun-if-changed={}", header.display());
    // Exported for crates that build C against the same headers (`DEP_UCP_INCLUDE`).
    if let Some(dir) = header.ancestors().nth(3) {
        println!("cargo:include={}", dir.display());
    }
    generate(&header, &include_dirs);
}

fn generate(header: &Path, include_dirs: &[PathBuf]) {
    let mut builder = bindgen::Builder::default()
        .header(header.display().to_string())
        .clang_args(include_dirs.iter().map(|d| format!("-I{}", d.display())))
        // Constants keep their C names (UCP_FEATURE_RMA, not ucp_feature_UCP_FEATURE_RMA).
        .prepend_enum_name(false)
        // The C comments are Doxygen, which rustdoc misreads; the UCX manual is the reference.
        .generate_comments(false)
        .layout_tests(true)
        .derive_default(true)
        .impl_debug(true)
        .wrap_unsafe_ops(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in ENUMS {
        builder = builder.allowlist_type(t);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {}: {e}", header.display()));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
