//! The manifest of a prebuilt kernel bundle: which CUBIN file holds which source for which
//! architecture, under which key.
//!
//! A bundle is a directory holding a file named [`MANIFEST_FILE`] and the CUBIN files it names.
//! The manifest is text, one record a line, fields separated by single spaces:
//!
//! ```text
//! tpserve-prebuilt-kernels 1
//! nvrtc 13.0
//! sm_90 rope.cu 0123456789abcdef0123456789abcdef sm_90/rope.cubin
//! ```
//!
//! The first line names the format and its version; `nvrtc` names the NVRTC that compiled the
//! bundle (for people: the key leaves it out, see `CacheKey::for_cubin`); then one entry per
//! (architecture, source): the key and the file's path relative to the bundle directory. Lines
//! starting with `#` and empty lines are ignored.
//!
//! Invariants, checked by [`Manifest::parse`]: the header comes first and the `nvrtc` line once;
//! each (architecture, source) appears once; architectures are `sm_<digits>[a-z]`, sources are
//! `.cu` file names, keys 32 lowercase hex digits, files relative paths that stay inside the
//! bundle. Parsing is linear in the text; a bundle has a few dozen entries.
//!
//! This file is compiled twice: as this module, and by `build.rs` (through `#[path]`), which
//! parses the manifest of the bundle it embeds. So it uses only `std`, and its error type
//! implements `Display` by hand rather than with `thiserror`, which the build script lacks.

use std::fmt;
use std::path::{Component, Path};

/// The manifest's file name inside a bundle directory.
pub const MANIFEST_FILE: &str = "manifest";

/// The first line of every manifest: the format and its version.
const HEADER: &str = "tpserve-prebuilt-kernels 1";

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The NVRTC that compiled the bundle, `(major, minor)`.
    pub nvrtc_version: (i32, i32),
    /// One entry per (architecture, source), in file order.
    pub entries: Vec<ManifestEntry>,
}

/// One CUBIN of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The architecture it runs on, e.g. `sm_90`.
    pub arch: String,
    /// The source file it was compiled from, e.g. `rope.cu`.
    pub source: String,
    /// The key of the expanded source and options it was compiled from (32 hex digits).
    pub key: String,
    /// The CUBIN's path relative to the bundle directory, e.g. `sm_90/rope.cubin`.
    pub file: String,
}

/// Why a manifest was refused: the 1-based line and what is wrong with it (line 0: the
/// manifest as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The 1-based line number, 0 when the problem is not one line's.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "bad kernel bundle manifest: {}", self.reason)
        } else {
            write!(
                f,
                "bad kernel bundle manifest, line {}: {}",
                self.line, self.reason
            )
        }
    }
}

impl std::error::Error for ManifestError {}

impl Manifest {
    /// Parses a manifest's text, checking every invariant of the module docs.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let fail = |line: usize, reason: String| ManifestError { line, reason };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        match lines.next() {
            Some((_, HEADER)) => {}
            Some((n, other)) => {
                return Err(fail(n, format!("expected {HEADER:?}, found {other:?}")))
            }
            None => return Err(fail(0, "empty".into())),
        }
        let mut nvrtc_version = None;
        let mut entries: Vec<ManifestEntry> = Vec::new();
        for (n, line) in lines {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields.as_slice() {
                ["nvrtc", version] => {
                    if nvrtc_version.is_some() {
                        return Err(fail(n, "a second nvrtc line".into()));
                    }
                    nvrtc_version = Some(
                        parse_version(version)
                            .ok_or_else(|| fail(n, format!("bad NVRTC version {version:?}")))?,
                    );
                }
                [arch, source, key, file] => {
                    let entry = ManifestEntry {
                        arch: arch.to_string(),
                        source: source.to_string(),
                        key: key.to_string(),
                        file: file.to_string(),
                    };
                    entry.check().map_err(|reason| fail(n, reason))?;
                    if entries
                        .iter()
                        .any(|e| e.arch == entry.arch && e.source == entry.source)
                    {
                        return Err(fail(n, format!("{arch} {source} listed twice")));
                    }
                    entries.push(entry);
                }
                _ => {
                    return Err(fail(
                        n,
                        format!("expected `arch source key file` or `nvrtc M.N`, found {line:?}"),
                    ))
                }
            }
        }
        let nvrtc_version = nvrtc_version.ok_or_else(|| fail(0, "no nvrtc line".into()))?;
        Ok(Manifest {
            nvrtc_version,
            entries,
        })
    }

    /// The manifest's text, which [`Manifest::parse`] reads back as `self`.
    pub fn render(&self) -> String {
        let (major, minor) = self.nvrtc_version;
        let mut text = format!("{HEADER}\nnvrtc {major}.{minor}\n# arch source key file\n");
        for e in &self.entries {
            text.push_str(&format!("{} {} {} {}\n", e.arch, e.source, e.key, e.file));
        }
        text
    }
}

impl ManifestEntry {
    /// Whether each field has its form (see the module docs); the reason when not.
    fn check(&self) -> Result<(), String> {
        let arch_ok = self.arch.strip_prefix("sm_").is_some_and(|rest| {
            let digits = rest.trim_end_matches(|c: char| c.is_ascii_lowercase());
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && rest.len() - digits.len() <= 1
        });
        if !arch_ok {
            return Err(format!("bad architecture {:?}", self.arch));
        }
        let source_ok = self.source.len() > ".cu".len()
            && self.source.ends_with(".cu")
            && !self.source.contains(['/', '\\']);
        if !source_ok {
            return Err(format!("bad source name {:?}", self.source));
        }
        let key_ok = self.key.len() == 32
            && self
                .key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !key_ok {
            return Err(format!("bad key {:?} (32 lowercase hex digits)", self.key));
        }
        let mut components = Path::new(&self.file).components().peekable();
        let file_ok = components.peek().is_some()
            && components.all(|c| matches!(c, Component::Normal(_)))
            && self.file != MANIFEST_FILE;
        if !file_ok {
            return Err(format!(
                "bad file {:?} (a relative path inside the bundle)",
                self.file
            ));
        }
        Ok(())
    }
}

fn parse_version(text: &str) -> Option<(i32, i32)> {
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn entry(arch: &str, source: &str) -> ManifestEntry {
        ManifestEntry {
            arch: arch.into(),
            source: source.into(),
            key: KEY.into(),
            file: format!("{arch}/{}.cubin", source.trim_end_matches(".cu")),
        }
    }

    fn error_of(text: &str) -> ManifestError {
        Manifest::parse(text).expect_err("the manifest was accepted")
    }

    #[test]
    fn manifest_round_trips_through_its_text() {
        let manifest = Manifest {
            nvrtc_version: (13, 0),
            entries: vec![
                entry("sm_80", "rope.cu"),
                entry("sm_90", "rope.cu"),
                entry("sm_90a", "attention.cu"),
            ],
        };
        let text = manifest.render();
        assert!(
            text.starts_with("tpserve-prebuilt-kernels 1\nnvrtc 13.0\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("sm_90 rope.cu {KEY} sm_90/rope.cubin\n")),
            "{text}"
        );
        assert_eq!(Manifest::parse(&text).unwrap(), manifest);
    }

    #[test]
    fn comments_and_blank_lines_are_ignored() {
        let text = format!(
            "\n# made by hand\ntpserve-prebuilt-kernels 1\n\nnvrtc 13.1\n# x\n\
             sm_86 rope.cu {KEY} a/b.cubin\n"
        );
        let manifest = Manifest::parse(&text).unwrap();
        assert_eq!(manifest.nvrtc_version, (13, 1));
        assert_eq!(manifest.entries.len(), 1);
        assert_eq!(manifest.entries[0].file, "a/b.cubin");
    }

    #[test]
    fn a_manifest_without_header_or_nvrtc_line_is_refused() {
        assert_eq!(error_of("").line, 0);
        assert_eq!(error_of("tpserve-prebuilt-kernels 2\nnvrtc 13.0\n").line, 1);
        assert_eq!(
            error_of(&format!("nvrtc 13.0\nsm_90 rope.cu {KEY} f\n")).line,
            1
        );
        let missing = error_of(&format!(
            "tpserve-prebuilt-kernels 1\nsm_90 rope.cu {KEY} f\n"
        ));
        assert_eq!(missing.line, 0);
        assert!(missing.to_string().contains("no nvrtc line"), "{missing}");
        let twice = error_of("tpserve-prebuilt-kernels 1\nnvrtc 13.0\nnvrtc 13.0\n");
        assert_eq!(twice.line, 3);
        assert_eq!(
            error_of("tpserve-prebuilt-kernels 1\nnvrtc 13\n").line,
            2,
            "a version needs major.minor"
        );
    }

    #[test]
    fn malformed_entries_are_refused_with_their_line() {
        let bad = [
            format!("sm_90 rope.cu {KEY}"),
            format!("sm_90 rope.cu {KEY} f extra"),
            format!("sm_90  rope.cu {KEY} f"),
            format!("compute_90 rope.cu {KEY} f"),
            format!("sm_ rope.cu {KEY} f"),
            format!("sm_90ab rope.cu {KEY} f"),
            format!("sm_90 rope.cuh {KEY} f"),
            format!("sm_90 dir/rope.cu {KEY} f"),
            format!("sm_90 .cu {KEY} f"),
            "sm_90 rope.cu 0123 f".to_string(),
            format!("sm_90 rope.cu {} f", KEY.to_uppercase()),
            format!("sm_90 rope.cu {KEY} /etc/passwd"),
            format!("sm_90 rope.cu {KEY} ../outside.cubin"),
            format!("sm_90 rope.cu {KEY} sm_90/../../x"),
            format!("sm_90 rope.cu {KEY} manifest"),
        ];
        for line in bad {
            let text = format!("tpserve-prebuilt-kernels 1\nnvrtc 13.0\n{line}\n");
            let err = error_of(&text);
            assert_eq!(err.line, 3, "{line:?}: {err}");
            assert!(err.to_string().contains("line 3"), "{err}");
        }
    }

    #[test]
    fn an_arch_and_source_listed_twice_is_refused() {
        let text = format!(
            "tpserve-prebuilt-kernels 1\nnvrtc 13.0\n\
             sm_90 rope.cu {KEY} a\nsm_80 rope.cu {KEY} b\nsm_90 rope.cu {KEY} c\n"
        );
        let err = error_of(&text);
        assert_eq!(err.line, 5);
        assert!(err.reason.contains("twice"), "{err}");
    }
}
