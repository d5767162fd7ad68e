//! The native build against the pinned Envoy binary: every Envoy callback the module imports is one
//! the binary exports (else loading fails with `undefined symbol`), and every hook the binary looks
//! up is one the module exports. Reads both with `nm -D`; needs `make native` and `make envoy`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test code")]

mod harness;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// `nm -D` symbol names of `file`, defined ones or undefined ones.
fn dynamic_symbols(file: &Path, defined: bool) -> BTreeSet<String> {
    let which = if defined { "--defined-only" } else { "--undefined-only" };
    let out = Command::new("nm").args(["-D", which]).arg(file).output().expect("nm (binutils) is needed");
    assert!(out.status.success(), "nm -D {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .map(str::to_owned)
        .collect()
}

fn module() -> std::path::PathBuf {
    let module = harness::repo().join("build/libtollgate.so");
    assert!(module.exists(), "{} is missing: run `make native`", module.display());
    module
}

#[test]
fn every_callback_the_module_imports_is_exported_by_the_pinned_envoy() {
    let exported = dynamic_symbols(&harness::envoy_binary(), true);
    let imported: BTreeSet<_> = dynamic_symbols(&module(), false)
        .into_iter()
        .filter(|s| s.starts_with("envoy_dynamic_module_callback_"))
        .collect();
    assert!(!imported.is_empty(), "the module imports no Envoy callback");
    let missing: Vec<_> = imported.difference(&exported).collect();
    assert!(missing.is_empty(), "callbacks the pinned Envoy does not export: {missing:?}");
}

#[test]
fn every_hook_the_pinned_envoy_looks_up_is_exported_by_the_module() {
    // Envoy looks hooks up by name: the names are strings in its binary.
    let out = Command::new("strings").arg(harness::envoy_binary()).output().expect("strings (binutils) is needed");
    let wanted: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("envoy_dynamic_module_on_http_filter_") || *l == "envoy_dynamic_module_on_program_init"
        })
        .filter(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned)
        .collect();
    assert!(wanted.len() > 20, "found only {wanted:?} in the Envoy binary");
    let exported = dynamic_symbols(&module(), true);
    let missing: Vec<_> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "hooks the module does not export: {missing:?}");
}
