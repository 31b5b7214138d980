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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino)
    }

    /// Whether `ino` was looked at already, without marking it.
    pub fn seen(&self, ino: u64) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ino)
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
    let mut needed = Vec::new();
    let mut paths = Vec::new();
    let (mut strtab, mut strsz) = (None, 0u64);
    for e in dynamic.chunks_exact(16) {
        let tag = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
        let val = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
        match tag {
            0 => break,
            1 => needed.push(val),
            5 => strtab = Some(val),
            10 => strsz = val,
            15 | 29 => paths.push(val),
            _ => {}
        }
    }
    let Some(strtab_off) = strtab.and_then(|v| elf.file_offset(v)) else {
        return out;
    };
    let Some(strings) = read_at(tree, fetcher, ino, strtab_off, strsz.min(MAX_TABLE)).await else {
        return out;
    };
    let origin = tree
        .node(dir)
        .map(|d| format!("/{}", d.entry.path))
        .unwrap_or_default();
    let mut search: Vec<String> = paths
        .iter()
        .flat_map(|&p| {
            cstr(&strings, p as usize)
                .split(':')
                .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect();
    search.extend(LIB_DIRS.iter().map(|d| d.to_string()));
    for n in needed {
        let name = cstr(&strings, n as usize);
        if name.is_empty() {
            continue;
        }
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
}
