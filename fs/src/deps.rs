//! Dependency-aware prefetch. When a program is first read, the files it
//! will load next are known from the file itself: an ELF executable or
//! library names its interpreter (`PT_INTERP`) and libraries (`DT_NEEDED`,
//! searched in its `DT_RUNPATH`/`DT_RPATH` and the standard directories), a
//! script names its interpreter on the `#!` line. Those files are requested
//! at once, in parallel, at on-demand priority, and their own dependencies
//! in turn, so starting a program costs a few round trips instead of one
//! per library. Only the few byte ranges that name the dependencies are
//! read (ELF64 little-endian; anything else is left alone), every offset is
//! bounds-checked, and a file is looked at once per mount.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

use breakfs_fetch::{Fetcher, Priority};
use breakfs_index::EntryKind;

use crate::tree::{Tree, read_from_store};

/// Library directories searched after the file's own run paths.
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// Dependencies up to this size are fetched whole at once.
const WHOLE_DEPENDENCY: u64 = 16 << 20;

/// Largest dynamic section or string table read.
const MAX_TABLE: u64 = 1 << 20;

/// Files already looked at in this mount.
#[derive(Default)]
pub struct DepPrefetch {
    seen: Mutex<HashSet<u64>>,
}

impl DepPrefetch {
    /// Whether `ino` was looked at already (marks it looked at).
    fn first_time(&self, ino: u64) -> bool {
        self.seen.lock().insert(ino)
    }

    /// Whether `ino` was looked at already, without marking it.
    pub fn seen(&self, ino: u64) -> bool {
        self.seen.lock().contains(&ino)
    }
}

/// Request the dependencies of file `ino` (and theirs), in the background
/// on runtime `rt`.
pub fn spawn(
    rt: &tokio::runtime::Handle,
    tree: Arc<Tree>,
    fetcher: Fetcher,
    deps: Arc<DepPrefetch>,
    ino: u64,
) {
    if !deps.first_time(ino) {
        return;
    }
    let handle = rt.clone();
    rt.spawn(async move {
        let found = dependencies(&tree, &fetcher, ino).await;
        for dep in found {
            if deps.seen(dep) {
                continue;
            }
            // Fetch the whole dependency now: a loader reads most of it
            // (only the start of a big one, such as an ICU data library,
            // which is mapped and touched sparsely).
            if let Some(n) = tree.node(dep) {
                let take = if n.entry.size <= WHOLE_DEPENDENCY {
                    n.chunks.len()
                } else {
                    1
                };
                for c in n.chunks.iter().take(take) {
                    if let Some(loc) = c.loc.clone()
                        && !c.is_present(fetcher.store())
                    {
                        let f = fetcher.clone();
                        handle.spawn(async move {
                            let _ = f.ensure(&loc, Priority::OnDemand, None).await;
                        });
                    }
                }
            }
            spawn(&handle, tree.clone(), fetcher.clone(), deps.clone(), dep);
        }
    });
}

/// What [`fetch_with_dependencies`] brought into the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosureFetched {
    /// Files looked at (the roots and what they load, in turn).
    pub files: usize,
    /// Content bytes of their chunks now in the store (fetched, or there
    /// already).
    pub bytes: u64,
    /// Chunks that could not be fetched.
    pub failed: usize,
}

/// Fetch the files `roots` of `tree` and, in turn, the files they load
/// (interpreter, libraries, a script's interpreter), at on-demand priority,
/// as a mount's dependency prefetch does when a program is first read
/// (each file whole, only the start of a big one); returns once all are in
/// the store or failed.
pub async fn fetch_with_dependencies(
    tree: &Tree,
    fetcher: &Fetcher,
    roots: &[u64],
) -> ClosureFetched {
    let mut seen = HashSet::new();
    let mut work = futures::stream::FuturesUnordered::new();
    for &r in roots {
        if seen.insert(r) {
            work.push(fetch_one(tree, fetcher, r));
        }
    }
    let mut got = ClosureFetched::default();
    while let Some((bytes, failed, deps)) = futures::StreamExt::next(&mut work).await {
        got.files += 1;
        got.bytes += bytes;
        got.failed += failed;
        for d in deps {
            if seen.insert(d) {
                work.push(fetch_one(tree, fetcher, d));
            }
        }
    }
    got
}

/// File `ino` into the store (whole, or the start of a big one) while its
/// dependencies are read from it: (bytes there, chunks failed, the
/// dependencies).
async fn fetch_one(tree: &Tree, fetcher: &Fetcher, ino: u64) -> (u64, usize, Vec<u64>) {
    let Some(n) = tree.node(ino) else {
        return (0, 0, Vec::new());
    };
    let take = if n.entry.size <= WHOLE_DEPENDENCY {
        n.chunks.len()
    } else {
        1
    };
    let fetches = n.chunks.iter().take(take).map(|c| async move {
        c.fetch(fetcher, Priority::OnDemand, None)
            .await
            .map(|()| c.size)
    });
    let (fetched, deps) = futures::future::join(
        futures::future::join_all(fetches),
        dependencies(tree, fetcher, ino),
    )
    .await;
    let bytes = fetched.iter().filter_map(|r| r.as_ref().ok()).sum();
    let failed = fetched.iter().filter(|r| r.is_err()).count();
    (bytes, failed, deps)
}

/// Read `len` bytes at `offset` of file `ino` through the store.
async fn read_at(
    tree: &Tree,
    fetcher: &Fetcher,
    ino: u64,
    offset: u64,
    len: u64,
) -> Option<Vec<u8>> {
    let n = tree.node(ino)?;
    let end = offset.checked_add(len)?.min(n.entry.size);
    if offset >= end {
        return None;
    }
    let deadline = Some(fetcher.options().deadline);
    for c in &n.chunks {
        if c.file_offset < end && c.file_offset + c.size > offset {
            c.fetch(fetcher, Priority::OnDemand, deadline).await.ok()?;
        }
    }
    let files: Vec<_> = n
        .chunks
        .iter()
        .map(|_| std::sync::OnceLock::new())
        .collect();
    read_from_store(fetcher.store(), n, &files, offset, end - offset).ok()
}

/// The inodes of the files `ino` loads first.
async fn dependencies(tree: &Tree, fetcher: &Fetcher, ino: u64) -> Vec<u64> {
    let Some(node) = tree.node(ino) else {
        return Vec::new();
    };
    if node.entry.kind != EntryKind::File || node.entry.size < 4 {
        return Vec::new();
    }
    let dir = node.parent;
    let Some(head) = read_at(tree, fetcher, ino, 0, 4096).await else {
        return Vec::new();
    };
    if head.starts_with(b"#!") {
        let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let text = String::from_utf8_lossy(&line[2..]);
        return text
            .split_whitespace()
            .next()
            .and_then(|p| tree.resolve(dir, p))
            .into_iter()
            .collect();
    }
    let Some(elf) = ElfHead::parse(&head) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some((off, len)) = elf.interp
        && let Some(b) = read_at(tree, fetcher, ino, off, len.min(4096)).await
    {
        let path = cstr(&b, 0);
        out.extend(tree.resolve(dir, &path));
    }
    let Some((off, len)) = elf.dynamic else {
        return out;
    };
    let Some(dynamic) = read_at(tree, fetcher, ino, off, len.min(MAX_TABLE)).await else {
        return out;
    };
    let dynamic = Dynamic::parse(&dynamic);
    let Some((strtab_off, strsz)) = elf.strings(&dynamic) else {
        return out;
    };
    let Some(strings) = read_at(tree, fetcher, ino, strtab_off, strsz).await else {
        return out;
    };
    let origin = tree
        .node(dir)
        .map(|d| format!("/{}", d.entry.path))
        .unwrap_or_default();
    let (names, run_paths) = dynamic.names(&strings);
    let mut search: Vec<String> = run_paths
        .iter()
        .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
        .filter(|d| !d.is_empty())
        .collect();
    search.extend(LIB_DIRS.iter().map(|d| d.to_string()));
    for name in names {
        let found = if name.contains('/') {
            tree.resolve(dir, &name)
        } else {
            search
                .iter()
                .find_map(|d| tree.resolve(dir, &format!("{d}/{name}")))
        };
        out.extend(found);
    }
    out
}

/// What an ELF file names for its loader, read from the file in memory
/// ([`elf_dependencies`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfDependencies {
    /// The interpreter (`PT_INTERP`), if any.
    pub interpreter: Option<String>,
    /// The libraries needed (`DT_NEEDED`), in order.
    pub needed: Vec<String>,
    /// The run paths (`DT_RUNPATH`, `DT_RPATH`), split at `:`, `$ORIGIN`
    /// not substituted.
    pub run_paths: Vec<String>,
}

/// The ELF reader of dependency-aware prefetch over a whole file in memory:
/// the entry point for fuzzing it (`fuzz/fuzz_targets/elf.rs`). It parses
/// as a mount does (the first 4 KiB for the headers, then the interpreter,
/// dynamic section and string table ranges, each bounded), from `file`
/// instead of the store; `None` for what is not an ELF64 little-endian file.
pub fn elf_dependencies(file: &[u8]) -> Option<ElfDependencies> {
    // `read_at`: the range clipped to the file, none if empty.
    let read = |offset: u64, len: u64| {
        let end = offset.checked_add(len)?.min(file.len() as u64);
        (offset < end).then(|| &file[offset as usize..end as usize])
    };
    let elf = ElfHead::parse(read(0, 4096)?)?;
    let mut out = ElfDependencies {
        interpreter: elf
            .interp
            .and_then(|(off, len)| read(off, len.min(4096)))
            .map(|b| cstr(b, 0)),
        ..ElfDependencies::default()
    };
    let Some(dynamic) = elf
        .dynamic
        .and_then(|(off, len)| read(off, len.min(MAX_TABLE)))
    else {
        return Some(out);
    };
    let dynamic = Dynamic::parse(dynamic);
    if let Some(strings) = elf.strings(&dynamic).and_then(|(off, len)| read(off, len)) {
        (out.needed, out.run_paths) = dynamic.names(strings);
    }
    Some(out)
}

/// What the dynamic section names, as offsets into its string table.
struct Dynamic {
    needed: Vec<u64>,
    paths: Vec<u64>,
    strtab: Option<u64>,
    strsz: u64,
}

impl Dynamic {
    fn parse(dynamic: &[u8]) -> Dynamic {
        let mut d = Dynamic {
            needed: Vec::new(),
            paths: Vec::new(),
            strtab: None,
            strsz: 0,
        };
        for e in dynamic.chunks_exact(16) {
            let tag = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
            let val = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
            match tag {
                0 => break,
                1 => d.needed.push(val),
                5 => d.strtab = Some(val),
                10 => d.strsz = val,
                15 | 29 => d.paths.push(val),
                _ => {}
            }
        }
        d
    }

    /// The needed libraries' names (empty ones left out) and the run path
    /// directories, from the string table `strings`.
    fn names(&self, strings: &[u8]) -> (Vec<String>, Vec<String>) {
        let needed = self
            .needed
            .iter()
            .map(|&n| cstr(strings, n as usize))
            .filter(|n| !n.is_empty())
            .collect();
        let paths = self
            .paths
            .iter()
            .flat_map(|&p| {
                cstr(strings, p as usize)
                    .split(':')
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|d| !d.is_empty())
            .collect();
        (needed, paths)
    }
}

/// The NUL-terminated string at `at` of `b` (empty if out of bounds).
fn cstr(b: &[u8], at: usize) -> String {
    let Some(rest) = b.get(at..) else {
        return String::new();
    };
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

/// What the program headers of an ELF64 little-endian file say.
struct ElfHead {
    /// File range of the interpreter path.
    interp: Option<(u64, u64)>,
    /// File range of the dynamic section.
    dynamic: Option<(u64, u64)>,
    /// Loadable segments: (vaddr, file offset, file size).
    loads: Vec<(u64, u64, u64)>,
}

impl ElfHead {
    fn parse(head: &[u8]) -> Option<ElfHead> {
        // Magic, 64-bit, little-endian.
        if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
            return None;
        }
        let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = u16_at(0x36)? as usize;
        let phnum = u16_at(0x38)? as usize;
        if phentsize < 56 || phnum > 256 {
            return None;
        }
        let mut h = ElfHead {
            interp: None,
            dynamic: None,
            loads: Vec::new(),
        };
        for i in 0..phnum {
            let p = phoff.checked_add(i.checked_mul(phentsize)?)?;
            let (ty, off, vaddr, filesz) =
                (u32_at(p)?, u64_at(p + 8)?, u64_at(p + 16)?, u64_at(p + 32)?);
            match ty {
                1 => h.loads.push((vaddr, off, filesz)),
                2 => h.dynamic = Some((off, filesz)),
                3 => h.interp = Some((off, filesz)),
                _ => {}
            }
        }
        Some(h)
    }

    /// The file range of the string table `dynamic` points to (bounded).
    fn strings(&self, dynamic: &Dynamic) -> Option<(u64, u64)> {
        let off = dynamic.strtab.and_then(|v| self.file_offset(v))?;
        Some((off, dynamic.strsz.min(MAX_TABLE)))
    }

    /// The file offset of virtual address `v`.
    fn file_offset(&self, v: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|(va, _, sz)| v >= *va && v - va < *sz)
            .map(|(va, off, _)| v - va + off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_headers_of_this_test_binary_parse() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let h = ElfHead::parse(&exe[..4096]).unwrap();
        assert!(h.dynamic.is_some());
        assert!(!h.loads.is_empty());
        // Garbage and truncated headers are refused, not trusted.
        assert!(ElfHead::parse(b"\x7fELF").is_none());
        let mut bad = exe[..4096].to_vec();
        bad[0x38] = 0xff;
        bad[0x39] = 0xff;
        assert!(ElfHead::parse(&bad).is_none());
        assert_eq!(cstr(b"libc.so.6\0x", 0), "libc.so.6");
        assert_eq!(cstr(b"abc", 99), "");
    }

    /// A small dynamic ELF64 file: an interpreter, two needed libraries,
    /// a run path and a string table reached through a loadable segment.
    /// Also the fuzz target's seed `fuzz/corpus/elf/tiny-dynamic`.
    fn tiny_elf() -> Vec<u8> {
        let (interp_at, dynamic_at, strings_at) = (0x100u64, 0x140u64, 0x1c0u64);
        let strings = b"\0libc.so.6\0libfoo.so\0$ORIGIN/../lib:/opt/lib\0";
        let mut f = vec![0u8; strings_at as usize + strings.len()];
        let put = |f: &mut Vec<u8>, at: u64, b: &[u8]| {
            f[at as usize..at as usize + b.len()].copy_from_slice(b)
        };
        // ELF header: magic, 64-bit, little-endian, 3 program headers at 64.
        put(&mut f, 0, b"\x7fELF\x02\x01\x01");
        put(&mut f, 0x20, &64u64.to_le_bytes());
        put(&mut f, 0x36, &56u16.to_le_bytes());
        put(&mut f, 0x38, &3u16.to_le_bytes());
        // (type, offset, vaddr, filesz): INTERP, DYNAMIC, and one LOAD of
        // the whole file at vaddr 0x400000.
        let headers = [
            (3u32, interp_at, interp_at, 28u64),
            (2, dynamic_at, 0x400000 + dynamic_at, 0x80),
            (1, 0, 0x400000, f.len() as u64),
        ];
        for (i, (ty, off, vaddr, filesz)) in headers.into_iter().enumerate() {
            let p = 64 + 56 * i as u64;
            put(&mut f, p, &ty.to_le_bytes());
            put(&mut f, p + 8, &off.to_le_bytes());
            put(&mut f, p + 16, &vaddr.to_le_bytes());
            put(&mut f, p + 32, &filesz.to_le_bytes());
        }
        put(&mut f, interp_at, b"/lib64/ld-linux-x86-64.so.2\0");
        // DT_NEEDED 1, DT_NEEDED 11, DT_RUNPATH 21, DT_STRTAB, DT_STRSZ, DT_NULL.
        let entries = [
            (1u64, 1u64),
            (1, 11),
            (29, 21),
            (5, 0x400000 + strings_at),
            (10, strings.len() as u64),
            (0, 0),
        ];
        for (i, (tag, val)) in entries.into_iter().enumerate() {
            put(&mut f, dynamic_at + 16 * i as u64, &tag.to_le_bytes());
            put(&mut f, dynamic_at + 16 * i as u64 + 8, &val.to_le_bytes());
        }
        put(&mut f, strings_at, strings);
        f
    }

    #[test]
    fn a_tiny_elf_names_its_interpreter_libraries_and_run_paths() {
        let elf = tiny_elf();
        assert_eq!(
            elf_dependencies(&elf),
            Some(ElfDependencies {
                interpreter: Some("/lib64/ld-linux-x86-64.so.2".into()),
                needed: vec!["libc.so.6".into(), "libfoo.so".into()],
                run_paths: vec!["$ORIGIN/../lib".into(), "/opt/lib".into()],
            })
        );
        // The fuzz target's seed is this file (BREAKFS_WRITE_ELF_SEED=1
        // writes it again).
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/elf/tiny-dynamic"
        );
        if std::env::var_os("BREAKFS_WRITE_ELF_SEED").is_some() {
            std::fs::write(seed, &elf).unwrap();
        }
        assert_eq!(
            std::fs::read(seed).unwrap(),
            elf,
            "{seed} is not tiny_elf()"
        );
        // Not ELF64 little-endian: left alone.
        assert_eq!(elf_dependencies(b"#!/bin/sh\n"), None);
        let mut big_endian = elf.clone();
        big_endian[5] = 2;
        assert_eq!(elf_dependencies(&big_endian), None);
    }

    #[test]
    fn elf_reader_survives_truncated_and_corrupted_files() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let real = elf_dependencies(&exe).unwrap();
        assert!(
            real.interpreter
                .as_deref()
                .is_some_and(|i| i.contains("ld-")),
            "{real:?}"
        );
        assert!(
            real.needed.iter().any(|n| n.starts_with("libc.so")),
            "{real:?}"
        );
        for file in [tiny_elf(), exe] {
            // Every prefix up to 8 KiB, and then every 4 KiB.
            let lens = (0..file.len().min(8192)).chain((8192..file.len()).step_by(4096));
            for len in lens {
                elf_dependencies(&file[..len]);
            }
            // Each byte of the headers and of the dynamic section set to
            // 0x00, 0x7f and 0xff: offsets, sizes and counts out of range.
            let dynamic = ElfHead::parse(&file[..4096.min(file.len())])
                .and_then(|h| h.dynamic)
                .map_or(0..0, |(off, len)| {
                    off as usize..(off + len.min(4096)) as usize
                });
            let header = 0..(64 + 56 * 16).min(file.len());
            let mut bad = file.clone();
            for i in header.chain(dynamic) {
                for b in [0x00, 0x7f, 0xff] {
                    bad[i] = b;
                    elf_dependencies(&bad);
                }
                bad[i] = file[i];
            }
        }
    }
}
