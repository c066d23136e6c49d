//! The module map at the top of src/lib.rs is the law: each line may use only modules on the
//! lines above it. This test reads the map and every library source file, and fails on any
//! `crate::X` path (outside `#[cfg(test)]` modules and comments) that points sideways or up, on a
//! module missing from the map, and on a map entry that is not a module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// (module -> line of the map) from the ```text block under "Module map" in src/lib.rs.
fn module_map(lib: &str) -> BTreeMap<String, usize> {
    let start = lib
        .find("# Module map")
        .expect("src/lib.rs has a '# Module map' section");
    let block = &lib[start..];
    let open = block.find("```text").expect("the map is a ```text block");
    let body = &block[open + "```text".len()..];
    let body = &body[..body.find("```").expect("the map block is closed")];
    let mut map = BTreeMap::new();
    for (line_no, line) in body
        .lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let names = line.split("  ").next().unwrap_or("");
        for m in names.split_whitespace() {
            assert!(
                map.insert(m.to_string(), line_no).is_none(),
                "module '{m}' appears twice in the map"
            );
        }
    }
    map
}

/// Library source files with their top-level module (src/x.rs and src/x/** belong to x).
fn library_files(src: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(src).unwrap().to_path_buf();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "main" || top == "cli" || top == "lib" {
                continue; // the binary sits above everything; lib.rs only declares
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((top, p));
            }
        }
    }
    out
}

/// The text without `#[cfg(test)] mod ... { }` blocks and without comment lines.
fn production_code(text: &str) -> String {
    let mut s = text.to_string();
    while let Some(at) = s.find("#[cfg(test)]") {
        let Some(brace) = s[at..].find('{').map(|i| at + i) else {
            break;
        };
        let mut depth = 0usize;
        let mut end = s.len();
        for (i, c) in s[brace..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = brace + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s.replace_range(at..end, "");
    }
    s.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level modules named by `crate::` paths, including `crate::{a::b, c}` groups.
fn used_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        let name: String = group[j..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        out.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::Error` / `crate::Result` are the error module's re-exports.
            out.push(if name == "Error" || name == "Result" {
                "error".into()
            } else {
                name
            });
        }
    }
    out
}

#[test]
fn library_dependencies_follow_the_module_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let map = module_map(&lib);
    let declared: Vec<String> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .map(|m| m.trim_end_matches(';').to_string())
        })
        .collect();
    for m in &declared {
        assert!(
            map.contains_key(m),
            "module '{m}' is declared in src/lib.rs but missing from the module map"
        );
    }
    for m in map.keys() {
        assert!(
            declared.contains(m),
            "the module map lists '{m}', which src/lib.rs does not declare"
        );
    }
    let mut violations = Vec::new();
    for (module, file) in library_files(&root.join("src")) {
        let code = production_code(&std::fs::read_to_string(&file).unwrap());
        assert!(
            !code.contains("super::super::"),
            "{}: reach other modules through crate::, not super::super::",
            file.display()
        );
        let own = map[&module];
        for used in used_modules(&code) {
            match map.get(&used) {
                None => violations.push(format!(
                    "{}: crate::{used} is not in the module map",
                    file.display()
                )),
                Some(&line) if used != module && line >= own => violations.push(format!(
                    "{}: {module} (map line {own}) uses {used} (map line {line})",
                    file.display()
                )),
                _ => {}
            }
        }
    }
    assert!(
        violations.is_empty(),
        "dependencies against the module map:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_grouped_and_plain_paths_and_skips_tests_and_comments() {
    let code = "use crate::{model::{A, B}, quant};\nfn f() { crate::kernels::x(); }\n// crate::train::y\n#[cfg(test)]\nmod tests { use crate::bench; }\n";
    let used = used_modules(&production_code(code));
    assert_eq!(used, vec!["model", "quant", "kernels"]);
}
