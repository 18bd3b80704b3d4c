//! Every `qmix` command that README.md and `docs/` show parses: for each one — a code-block line
//! `cargo run --release -p qmix-cli -- SUB …` (with its `\` continuation lines) or an inline
//! `` `qmix SUB …` `` span — `qmix SUB --help` succeeds and lists every `--flag` the command uses.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

/// The commands a Markdown text shows, each as `SUB ARGS…` (shell comments cut off).
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Code-block lines, continuation lines joined.
    let mut joined = String::new();
    for line in text.lines() {
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                continue;
            }
            None => joined.push_str(line),
        }
        if let Some((_, rest)) = joined.split_once("-p qmix-cli -- ") {
            let rest = rest.split(" #").next().unwrap_or_default();
            out.push(rest.trim().to_string());
        }
        joined.clear();
    }
    // Inline spans.
    for span in text.split('`').skip(1).step_by(2) {
        if let Some(rest) = span.strip_prefix("qmix ") {
            out.push(rest.trim().to_string());
        }
    }
    out
}

/// The `--flags` a help text lists.
fn flags_in(help: &str) -> BTreeSet<String> {
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(String::from)
        .collect()
}

#[test]
fn every_documented_command_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut helps: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let file = file.strip_prefix(&root).unwrap_or(file);
        for command in commands(&text) {
            let Some(sub) = command.split_whitespace().next() else { continue };
            // Placeholders such as `qmix <command> --help`.
            if !sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                continue;
            }
            let known = helps.entry(sub.to_string()).or_insert_with(|| {
                let o = Command::new(env!("CARGO_BIN_EXE_qmix")).args([sub, "--help"]).output().unwrap();
                if o.status.success() {
                    flags_in(&String::from_utf8_lossy(&o.stdout))
                } else {
                    BTreeSet::new()
                }
            });
            if known.is_empty() {
                problems.push(format!("{}: `qmix {command}`: no subcommand '{sub}'", file.display()));
                continue;
            }
            for flag in flags_in(&command) {
                if !known.contains(&flag) {
                    problems.push(format!("{}: `qmix {command}`: '{sub}' has no {flag}", file.display()));
                }
            }
            checked += 1;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 20, "only {checked} documented commands found");
}
