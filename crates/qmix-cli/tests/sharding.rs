//! Enable-one sharding: shard processes launched at once against one output folder — as a Slurm
//! job array or a Kubernetes Indexed Job launches them, `--shard auto` reading the index from the
//! environment — each write their own scores, and the next run without `--shard` merges them into
//! exactly the unsharded result without scoring a layer again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn digits() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits_cnn.onnx")
}

fn qmix(cmd: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmix"));
    c.arg(cmd).arg(digits()).args(["--quiet", "--threads", "1", "--out"]).arg(out).args(extra);
    for k in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"]
    {
        c.env_remove(k);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn succeeded(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Launches every command at once and waits for all of them.
fn all_at_once(commands: Vec<Command>) -> Vec<String> {
    let children: Vec<_> = commands.into_iter().map(|mut c| c.spawn().unwrap()).collect();
    children.into_iter().map(|c| succeeded(c.wait_with_output().unwrap())).collect()
}

fn cache_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join(".cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn slurm_array_shards_of_litemp_merge_into_the_unsharded_result() {
    let whole = common::scratch("litemp-whole");
    succeeded(qmix("litemp", &whole, &[]).output().unwrap());
    let out = common::scratch("litemp-shards");
    // An array --array=1-3: task ids 1, 2, 3 are shards 0, 1, 2.
    let shards = (1..=3)
        .map(|id| {
            let mut c = qmix("litemp", &out, &["--shard", "auto"]);
            c.env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_COUNT", "3");
            c
        })
        .collect();
    let said = all_at_once(shards);
    for (i, s) in said.iter().enumerate() {
        assert!(s.contains(&format!("enable-one shard {i}/3")), "{s}");
    }
    let files = cache_files(&out);
    assert_eq!(files.len(), 3, "one file per shard: {files:?}");
    assert!(files.iter().all(|f| f.contains(".shard-") && f.ends_with("-of-3.json")), "{files:?}");
    assert!(!out.join("layer_sensitivity.json").exists(), "a shard writes no results");
    let merged = succeeded(qmix("litemp", &out, &[]).output().unwrap());
    assert!(merged.contains("8 of them cached in"), "{merged}");
    assert_eq!(cache_files(&out).len(), 4, "the main file takes in the shards'");
    for f in [
        "layer_sensitivity.json",
        "layer_sensitivity_ranked.json",
        "flipped_layers.json",
        "model_mixed.encodings",
    ] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(whole.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn kubernetes_indexed_job_shards_of_analyze_merge_into_the_unsharded_result() {
    let scores = |out: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join("layer_sensitivity.json")).unwrap()).unwrap()
    };
    let whole = common::scratch("analyze-whole");
    succeeded(qmix("analyze", &whole, &[]).output().unwrap());
    let out = common::scratch("analyze-shards");
    let shards = (0..2)
        .map(|index| {
            let mut c = qmix("analyze", &out, &["--shard", "auto/2"]);
            c.env("JOB_COMPLETION_INDEX", index.to_string());
            c
        })
        .collect();
    all_at_once(shards);
    succeeded(qmix("analyze", &out, &[]).output().unwrap());
    assert_eq!(scores(&out), scores(&whole));
    // A shard that does not exist, and auto outside a batch engine, are user errors.
    for shard in ["2/2", "auto"] {
        let o = qmix("analyze", &out, &["--shard", shard]).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// The `--flags` of `qmix SUB --help`.
fn help_flags(sub: &str) -> Vec<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_qmix")).args([sub, "--help"]).output().unwrap();
    let help = succeeded(o);
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(String::from)
        .collect()
}

fn assert_flags_exist(sub: &str, args: &[String]) {
    let known = help_flags(sub);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(known.contains(a), "qmix {sub} has no {a}");
    }
}

#[test]
fn the_slurm_script_in_the_docs_is_valid_and_shards_by_its_array() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/jobs/qmix-amp-shards.sbatch");
    let syntax = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(syntax.status.success(), "{}", String::from_utf8_lossy(&syntax.stderr));
    let text = std::fs::read_to_string(&path).unwrap();
    let array = text.lines().find_map(|l| l.strip_prefix("#SBATCH --array=")).expect("an array job");
    let (first, last) = array.split_once('-').unwrap();
    assert!(first.parse::<usize>().unwrap() <= last.parse::<usize>().unwrap());
    // The qmix command, continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let command = joined.lines().find(|l| l.starts_with("qmix ")).expect("a qmix command");
    let words: Vec<String> = command.split_whitespace().map(String::from).collect();
    assert!(command.contains("--shard auto"), "{command}");
    assert_flags_exist(&words[1], &words);
}

#[test]
fn the_kubernetes_manifest_in_the_docs_is_an_indexed_job_whose_count_matches() {
    use yaml_rust2::{Yaml, YamlLoader};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/jobs/qmix-amp-shards.yaml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(docs.len(), 1);
    let job = &docs[0];
    assert_eq!(job["apiVersion"].as_str(), Some("batch/v1"));
    assert_eq!(job["kind"].as_str(), Some("Job"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_i64().unwrap();
    assert!((1..=completions).contains(&spec["parallelism"].as_i64().unwrap()));
    let pod = &spec["template"]["spec"];
    assert!(matches!(pod["restartPolicy"].as_str(), Some("Never" | "OnFailure")));
    let container = &pod["containers"][0];
    assert_eq!(container["command"][0].as_str(), Some("qmix"));
    let args: Vec<String> =
        container["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let shard = args.iter().position(|a| a == "--shard").expect("--shard");
    assert_eq!(args[shard + 1], format!("auto/{completions}"));
    assert_flags_exist(&args[0], &args);
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let out = &args[args.iter().position(|a| a == "--out").unwrap() + 1];
    assert!(mounts.iter().any(|m| out.starts_with(m)), "--out {out} lies on a mounted volume: {mounts:?}");
    assert!(!matches!(pod["volumes"], Yaml::BadValue));
}
