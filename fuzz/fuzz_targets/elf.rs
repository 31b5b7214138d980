//! The ELF reader of dependency-aware prefetch (breakfs-fs), fed a file as
//! an image layer would hold it: it reads only what the headers point to,
//! bounds-checked, and what it names is consistent with its input.

#![no_main]

use breakfs_fs::elf_dependencies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(found) = elf_dependencies(data) else {
        return;
    };
    assert!(
        data.len() >= 64 && data.starts_with(b"\x7fELF\x02\x01"),
        "read as ELF64 little-endian: {:?}",
        &data[..data.len().min(6)]
    );
    assert!(
        found
            .needed
            .iter()
            .all(|n| !n.is_empty() && !n.contains('\0')),
        "{found:?}"
    );
    assert!(
        found
            .run_paths
            .iter()
            .all(|p| !p.is_empty() && !p.contains([':', '\0'])),
        "{found:?}"
    );
    assert!(
        found.interpreter.as_ref().is_none_or(|i| !i.contains('\0')),
        "{found:?}"
    );
    // A pure function of the bytes.
    assert_eq!(elf_dependencies(data), Some(found));
});
