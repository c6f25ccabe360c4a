//! The shape of the code, checked (docs/ARCHITECTURE.md): no module of the `escrow` or
//! `escrow-store` library imports one that imports it back, directly or around a loop (a loop
//! is what keeps a second catalog or storage backend from being plugged in at a seam); the
//! storage engine depends on no HTTP or CLI crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `escrow/src` (a file or a folder) and the top-level modules it
/// names as `crate::x` (in paths or in `use crate::{x, ...}`); `bin/` is not the library.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("utf-8")
                .trim_end_matches(".rs")
                .to_string();
            if top == "bin" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let code: String = (text.lines())
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let names = out.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    for part in group.split(',') {
                        let name: String = (part.trim().chars())
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        names.insert(name);
                    }
                } else {
                    let name: String = (rest.chars())
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    names.insert(name);
                }
            }
            names.remove(&top);
        }
    }
    let modules: BTreeSet<String> = out.keys().cloned().collect();
    for names in out.values_mut() {
        names.retain(|n| modules.contains(n));
    }
    out
}

/// A loop through `from`, if there is one: the path back to it.
fn loop_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut paths = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = paths.pop() {
        let last = path.last().expect("non-empty");
        for next in &graph[last] {
            if next == from {
                let mut found = path.clone();
                found.push(next.clone());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                paths.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let escrow = imports(&root.join("escrow/src"));
    let store = imports(&root.join("store/src"));
    assert!(escrow.len() > 10, "modules found: {:?}", escrow.keys());
    assert!(store.len() > 10, "modules found: {:?}", store.keys());
    assert!(store["catalog"].contains("model"), "{:?}", store["catalog"]);
    for graph in [escrow, store] {
        let loops: Vec<String> = (graph.keys())
            .filter_map(|m| loop_through(&graph, m))
            .map(|l| l.join(" -> "))
            .collect();
        assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
    }
}

/// The `[dependencies]` of the workspace crate in `dir`, by name.
fn dependencies(dir: &str) -> Vec<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../{dir}/Cargo.toml"));
    let text = std::fs::read_to_string(&manifest).expect("Cargo.toml");
    (text.split("[dependencies]").nth(1).expect("dependencies"))
        .split("\n[")
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split(['.', '=', ' ']).next())
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_query_engine_knows_nothing_of_casbin() {
    let deps = dependencies("query");
    assert!(deps.iter().any(|d| d == "datafusion"), "{deps:?}");
    for d in ["casbin", "escrow-policies", "escrow-store"] {
        assert!(!deps.iter().any(|x| x == d), "escrow-query depends on {d}");
    }
}

#[test]
fn the_storage_engine_depends_on_no_http_or_cli_crate() {
    let deps = dependencies("store");
    let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
    assert!(deps.contains(&"rusqlite"), "{deps:?}");
    assert!(deps.contains(&"tokio-postgres"), "{deps:?}");
    for http in [
        "axum",
        "hyper",
        "hyper-util",
        "reqwest",
        "clap",
        "tower",
        "tokio-rustls",
    ] {
        assert!(!deps.contains(&http), "escrow-store depends on {http}");
    }
}
