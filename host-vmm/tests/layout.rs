//! The layout of `host-vmm/src` stays honest: no circle between its folders (the
//! top-level modules: `vstate`, `devices`, `policy`, `lifecycle`, ...), and the vCPU
//! loop (`vstate/vcpu.rs`) never names the VM (`vstate/vm.rs`).
//!
//! A file's dependencies are its `crate::...` paths (in `use` lines or inline), with
//! names re-exported at the crate root resolved through `lib.rs`. Comments and
//! `#[cfg(test)]` modules do not count: a unit test may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `host-vmm/src`, or `$HILRIG_LAYOUT_SRC` (to show the checks failing on an older tree).
fn src() -> PathBuf {
    std::env::var_os("HILRIG_LAYOUT_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text of a file without comments and without its `#[cfg(test)]` items.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            // Skip the next item: up to the line where its braces balance.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every `crate::NAME` a file names (first path segment), including each name of a
/// `crate::{a, b::c}` group.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let n = ident(part.trim());
                if !n.is_empty() {
                    refs.insert(n);
                }
            }
        } else {
            let n = ident(rest);
            if !n.is_empty() {
                refs.insert(n);
            }
        }
    }
    refs
}

/// Names `lib.rs` re-exports, mapped to the module they come from
/// (`pub use vstate::vm::{Vm, ...}` → `Vm` → `vstate`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = code_of(lib);
    for stmt in code.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.rsplit("::").next().unwrap_or(names);
        for n in names
            .trim_matches(|c: char| c == '{' || c == '}' || c.is_whitespace())
            .split(',')
        {
            let n = n.rsplit(" as ").next().unwrap_or(n).trim();
            if !n.is_empty() {
                map.insert(n.to_string(), module.trim().to_string());
            }
        }
    }
    map
}

/// Folder (top-level module) → the folders its files name.
fn folder_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let top = |p: &Path| -> String {
        let rel = p.strip_prefix(&root).expect("under src");
        let first = rel.components().next().expect("a component");
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| top(p))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("lib.rs");
    let re = reexports(&lib);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top(f);
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("source file");
        let entry = graph.entry(from.clone()).or_default();
        for r in crate_refs(&code_of(&text)) {
            let to = if modules.contains(&r) {
                Some(r)
            } else {
                re.get(&r).filter(|m| modules.contains(*m)).cloned()
            };
            if let Some(to) = to.filter(|t| *t != from) {
                entry.insert(to);
            }
        }
    }
    graph
}

/// The circles of `graph` (strongly connected sets of more than one node).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by repeated search: the graph has a dozen nodes.
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut placed = BTreeSet::new();
    for n in graph.keys() {
        if placed.contains(n) {
            continue;
        }
        let fwd = reach(n);
        let mut scc: Vec<String> = fwd
            .iter()
            .filter(|m| *m != n && reach(m).contains(n))
            .cloned()
            .collect();
        if !scc.is_empty() {
            scc.push(n.clone());
            scc.sort();
            placed.extend(scc.iter().cloned());
            out.push(scc);
        }
    }
    out
}

#[test]
fn no_circle_between_the_folders_of_src() {
    let graph = folder_graph();
    assert!(
        graph.contains_key("vstate") && graph.contains_key("policy"),
        "the layout parser found no folders: {graph:?}"
    );
    let found = circles(&graph);
    assert!(
        found.is_empty(),
        "host-vmm/src folders import each other in a circle: {found:?}\nedges: {graph:#?}"
    );
}

#[test]
fn the_vcpu_loop_does_not_name_the_vm() {
    let text = std::fs::read_to_string(src().join("vstate/vcpu.rs")).expect("vcpu.rs");
    let code = code_of(&text);
    for bad in ["vstate::vm", "super::vm", "vm::Shared", "Shared"] {
        assert!(
            !code.contains(bad),
            "vstate/vcpu.rs names the VM (`{bad}`): use the VcpuHost/DirectPages traits"
        );
    }
}

#[test]
fn the_parser_sees_circles_and_groups() {
    // The checker itself: a planted circle is found, groups and re-exports resolve,
    // comments and test modules do not count.
    let code = code_of(
        "use crate::{a::X, b};\n// crate::c\nlet x = crate::d::f(); // crate::e\n#[cfg(test)]\nmod tests {\n    use crate::g;\n}\nuse crate::h;\n",
    );
    let refs = crate_refs(&code);
    let want: BTreeSet<String> = ["a", "b", "d", "h"].iter().map(|s| s.to_string()).collect();
    assert_eq!(refs, want);
    let re = reexports("pub use vstate::vm::{\n    Vm, VmConfig,\n};\npub use error::VmmError;\n");
    assert_eq!(re.get("VmConfig").map(String::as_str), Some("vstate"));
    assert_eq!(re.get("VmmError").map(String::as_str), Some("error"));
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(
        circles(&g),
        vec![vec!["a".to_string(), "b".into(), "c".into()]]
    );
    g.get_mut("c").expect("c").clear();
    assert!(circles(&g).is_empty());
}
