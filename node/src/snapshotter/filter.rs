//! containerd's filter syntax, as far as snapshot listings use it:
//! `FIELD`, `FIELD==VALUE`, `FIELD!=VALUE`, clauses joined by `,` (all
//! must hold), over the fields `name`, `parent`, `kind` and
//! `labels.KEY` (a key with dots or other punctuation is quoted:
//! `labels."containerd.io/gc.root"`). Several filters in one request
//! match when any of them does. `~=` (regular expressions) is refused
//! with a reason rather than ignored.

use super::meta::Snapshot;
use super::{Fault, fault};
use crate::Result;

/// One parsed filter: clauses that must all hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Filter(Vec<Clause>);

#[derive(Debug, PartialEq, Eq)]
struct Clause {
    path: Vec<String>,
    test: Test,
}

#[derive(Debug, PartialEq, Eq)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
}

impl Filter {
    /// Parse `text`; InvalidArgument with the reason when it is not a filter.
    pub(crate) fn parse(text: &str) -> Result<Filter> {
        let bad = |why: &str| fault(Fault::InvalidArgument, format!("the filter {text:?} {why}"));
        let mut clauses = Vec::new();
        let mut p = Parser {
            s: text.as_bytes(),
            at: 0,
        };
        loop {
            p.skip_spaces();
            let mut path = vec![p.word().map_err(&bad)?];
            while p.eat(b'.') {
                path.push(p.word().map_err(&bad)?);
            }
            p.skip_spaces();
            let test = if p.eat_str("==") {
                Test::Equal(p.value().map_err(&bad)?)
            } else if p.eat_str("!=") {
                Test::NotEqual(p.value().map_err(&bad)?)
            } else if p.eat_str("~=") {
                return Err(bad(
                    "uses ~= (a regular expression), which this snapshotter does not support",
                ));
            } else {
                Test::Present
            };
            clauses.push(Clause { path, test });
            p.skip_spaces();
            if p.done() {
                break;
            }
            if !p.eat(b',') {
                return Err(bad("has something other than `,` after a clause"));
            }
        }
        Ok(Filter(clauses))
    }

    /// Whether snapshot `s`, named `key`, passes every clause.
    pub(crate) fn matches(&self, key: &str, s: &Snapshot) -> bool {
        self.0.iter().all(|c| {
            let field = match c.path.as_slice() {
                [f] if f == "name" => Some(key),
                // No parent is the empty one: containerd's metadata store
                // looks for a remote layer's target with `parent==""`.
                [f] if f == "parent" => {
                    Some(s.parent.as_str()).filter(|p| !p.is_empty() || c.test != Test::Present)
                }
                [f] if f == "kind" => Some(s.kind.name()),
                [f, k] if f == "labels" => s.labels.get(k).map(String::as_str),
                _ => None,
            };
            match (&c.test, field) {
                (Test::Present, f) => f.is_some(),
                (Test::Equal(v), f) => f == Some(v.as_str()),
                (Test::NotEqual(v), f) => f != Some(v.as_str()),
            }
        })
    }
}

/// Whether `s` passes any of `filters` (all pass when there are none).
pub(crate) fn any_matches(filters: &[Filter], key: &str, s: &Snapshot) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(key, s))
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.at >= self.s.len()
    }

    fn skip_spaces(&mut self) {
        while self.s.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.s.get(self.at) == Some(&b);
        self.at += usize::from(hit);
        hit
    }

    fn eat_str(&mut self, t: &str) -> bool {
        let hit = self.s[self.at..].starts_with(t.as_bytes());
        if hit {
            self.at += t.len();
        }
        hit
    }

    /// A field name: letters, digits, `_` and `-`, or a quoted string.
    fn word(&mut self) -> std::result::Result<String, &'static str> {
        if self.s.get(self.at) == Some(&b'"') {
            return self.quoted();
        }
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        {
            self.at += 1;
        }
        if start == self.at {
            return Err("has an empty or malformed field name");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// A value: a quoted string, or a run of characters other than `,`,
    /// `"` and white space.
    fn value(&mut self) -> std::result::Result<String, &'static str> {
        self.skip_spaces();
        if self.s.get(self.at) == Some(&b'"') {
            return self.quoted();
        }
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|b| *b != b',' && *b != b'"' && !b.is_ascii_whitespace())
        {
            self.at += 1;
        }
        let v = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
        if v.is_empty() {
            return Err("compares with an empty value (quote it: \"\")");
        }
        Ok(v)
    }

    /// A string in double quotes, with `\"` and `\\` escapes.
    fn quoted(&mut self) -> std::result::Result<String, &'static str> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.at) {
                None => return Err("has an unterminated quote"),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    let Some(&c) = self.s.get(self.at + 1) else {
                        return Err("ends in a backslash");
                    };
                    out.push(c);
                    self.at += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::meta::Kind;
    use super::*;

    fn snap(kind: Kind, parent: &str, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
            remote: None,
        }
    }

    #[test]
    fn filters_match_fields_and_labels() {
        let s = snap(
            Kind::Committed,
            "base",
            &[("containerd.io/gc.root", "x"), ("team", "edge")],
        );
        let yes = [
            "kind==committed",
            "name==k1",
            "parent==base",
            "parent",
            "labels.team==edge",
            r#"labels."containerd.io/gc.root""#,
            r#"labels."containerd.io/gc.root"==x, kind==committed"#,
            "labels.team!=core",
            r#"name=="k1""#,
        ];
        for f in yes {
            let parsed = Filter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(parsed.matches("k1", &s), "{f} should match");
        }
        let no = [
            "kind==active",
            "labels.team==core",
            "labels.other",
            "kind==committed,name==k2",
            "size==3",
        ];
        for f in no {
            let parsed = Filter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!parsed.matches("k1", &s), "{f} should not match");
        }
        let root = snap(Kind::Active, "", &[]);
        assert!(!Filter::parse("parent").expect("parses").matches("r", &root));
        let target = r#"labels."containerd.io/snapshot.ref"==sha256:c,parent=="""#;
        let mut remote = snap(
            Kind::Committed,
            "",
            &[("containerd.io/snapshot.ref", "sha256:c")],
        );
        assert!(Filter::parse(target).expect("parses").matches("t", &remote));
        remote.parent = "base".into();
        assert!(!Filter::parse(target).expect("parses").matches("t", &remote));
        let any = [
            Filter::parse("kind==view").expect("parses"),
            Filter::parse("kind==active").expect("parses"),
        ];
        assert!(any_matches(&any, "r", &root));
        assert!(any_matches(&[], "r", &root));
    }

    #[test]
    fn malformed_filters_say_why() {
        for (f, why) in [
            ("name~=k.*", "regular expression"),
            ("labels.\"open", "unterminated"),
            ("", "empty or malformed"),
            ("kind==", "empty value"),
            ("name==k1 kind", "other than `,`"),
        ] {
            match Filter::parse(f) {
                Err(e) => assert!(e.to_string().contains(why), "{f}: {e}"),
                Ok(p) => panic!("{f} parsed as {p:?}"),
            }
        }
    }
}
