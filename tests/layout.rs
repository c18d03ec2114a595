//! The architecture, checked: modules only import modules below them (so there are no cycles),
//! and no function in `src/` grows past what a reader takes in at once. The README's
//! Development section draws the same layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom. A module may import only modules on a lower line; modules on one line do not
/// import each other.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["daemon", "demo", "release"],
    &["engine", "output"],
    &["server", "reload"],
    &["status"],
    &["fleet"],
    &["sweep"],
    &["store"],
    &["iyzico", "clock"],
    &["telemetry"],
    &["config", "shutdown", "build_info"],
];

/// The longest function allowed in `src/`, in lines, signature and closing brace included.
const MAX_FUNCTION_LINES: usize = 80;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn source_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files.sort();
    files
}

/// `src/store/core.rs` → `store`; `src/cli.rs` → `cli`.
fn module_of(file: &Path) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let first = file
        .strip_prefix(&src)
        .unwrap()
        .components()
        .next()
        .unwrap();
    let name = first.as_os_str().to_str().unwrap();
    name.trim_end_matches(".rs").to_owned()
}

/// The text with comments, string and char literals blanked out (newlines kept, so line
/// numbers still hold): what is left is code.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            i + rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            i + rest
                .windows(2)
                .position(|w| w == b"*/")
                .expect("closed comment")
                + 2
        } else if let Some(len) = raw_string_len(b, i) {
            i + len
        } else if rest[0] == b'"' {
            i + quoted_len(rest, b'"')
        } else if rest[0] == b'\'' && is_char_literal(text, i) {
            i + quoted_len(rest, b'\'')
        } else {
            out.push(rest[0]);
            i += 1;
            continue;
        };
        out.extend(b[i..end].iter().map(|&c| blank(c)));
        i = end;
    }
    String::from_utf8(out).unwrap()
}

/// Length of `"…"` or `'…'` starting at `rest[0]`, escapes honoured.
fn quoted_len(rest: &[u8], quote: u8) -> usize {
    let mut j = 1;
    while rest[j] != quote {
        j += if rest[j] == b'\\' { 2 } else { 1 };
    }
    j + 1
}

/// `r"…"`, `r#"…"#`, `br#"…"#` starting at `i`: their length.
fn raw_string_len(b: &[u8], i: usize) -> Option<usize> {
    let preceded_by_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    let start = match (b[i], b.get(i + 1)) {
        (b'r', _) => i + 1,
        (b'b', Some(b'r')) => i + 2,
        _ => return None,
    };
    if preceded_by_ident {
        return None;
    }
    let hashes = b[start..].iter().take_while(|&&c| c == b'#').count();
    if b.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = start + hashes + 1;
    let at = b[body..].windows(close.len()).position(|w| w == close)?;
    Some(body + at + close.len() - i)
}

/// A `'` opens a char literal (`'x'`, `'\n'`, `'é'`), not a lifetime (`'a`).
fn is_char_literal(text: &str, i: usize) -> bool {
    let mut chars = text[i + 1..].chars();
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// The top-level modules `code` names through `crate::`, with the line of each first mention.
fn crate_imports(code: &str) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                inner.split(',').map(str::trim).collect()
            } else {
                vec![rest]
            };
            for name in names {
                let ident: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !ident.is_empty() {
                    found.entry(ident).or_insert(n + 1);
                }
            }
        }
    }
    found
}

/// Every `fn` with a body in `code`: its name, first line and length in lines.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let mut depth = 0usize;
        let mut opened = false;
        'body: for (end, l) in lines.iter().enumerate().skip(start) {
            for c in l.chars() {
                match c {
                    ';' if !opened => break 'body,
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth -= 1;
                        if opened && depth == 0 {
                            out.push((name.clone(), start + 1, end - start + 1));
                            break 'body;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// `pub(crate) async fn name<…>(` → `name`.
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    if let Some(r) = rest.strip_prefix("pub") {
        rest = r.trim_start();
        if rest.starts_with('(') {
            rest = rest[rest.find(')')? + 1..].trim_start();
        }
    }
    for qualifier in ["const ", "async ", "unsafe "] {
        if let Some(r) = rest.strip_prefix(qualifier) {
            rest = r.trim_start();
        }
    }
    let rest = rest.strip_prefix("fn ")?;
    Some(
        rest.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect(),
    )
}

#[test]
fn modules_import_only_modules_below_them() {
    let mut wrong = Vec::new();
    for file in source_files() {
        let module = module_of(&file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            wrong.push(format!("{module}: not in LAYERS (add it where it belongs)"));
            continue;
        };
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for (imported, line) in crate_imports(&code) {
            if imported == module {
                continue;
            }
            match layer_of(&imported) {
                Some(theirs) if theirs > own => {}
                Some(_) => wrong.push(format!(
                    "{}:{line}: {module} imports {imported}, which is not below it",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{}:{line}: {imported} is not in LAYERS",
                    file.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_function_in_src_is_longer_than_a_screen() {
    let mut long = Vec::new();
    for file in source_files() {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for (name, line, lines) in functions(&code) {
            if lines > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}:{line}: {name} has {lines} lines",
                    file.display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these into steps (at most {MAX_FUNCTION_LINES} lines):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // The scanner itself: comments and strings are not code, raw strings and lifetimes parse.
    let code = code_only(
        "// crate::cli in a comment\nfn f<'a>(x: &'a str) -> char {\n    let _ = r#\"crate::cli {\"#;\n    let _ = \"}\";\n    crate::store::open();\n    '{'\n}\n",
    );
    assert_eq!(
        crate_imports(&code).into_keys().collect::<Vec<_>>(),
        ["store"]
    );
    assert_eq!(functions(&code), [("f".to_owned(), 2, 6)]);
    assert_eq!(
        crate_imports("use crate::{config::Config, store::Store};")
            .into_keys()
            .collect::<Vec<_>>(),
        ["config", "store"]
    );
}
