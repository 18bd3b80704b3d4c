//! `--shard`: which share of a job's independent evaluations this process computes — `I/N`
//! (shard I of N, from 0), or `auto`, read from the batch engine that launched it: a Slurm job
//! array (`SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`) or a
//! Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, of `auto/N` with N the Job's `completions`,
//! since Kubernetes does not tell the pods how many there are).

use std::time::Instant;

use qanalyze::{EnableOneCache, FloatReference, Scorer};
use qcalib::QuantSim;

use crate::Failure;
use crate::dataset::{advance, bar, user};

/// Scores the enable-one layers of `cache`'s shard that it does not know yet, and says so: what
/// a `--shard` run of `analyze` or `litemp` does instead of its job.
pub fn score_enable_one_shard(
    sim: &mut QuantSim,
    reference: &FloatReference,
    metric: impl Scorer,
    cache: &mut EnableOneCache,
    quiet: bool,
) -> Result<(), Failure> {
    let (i, n) = cache.shard().unwrap_or((0, 1));
    let layers = qanalyze::layers(sim).map_err(user)?.len();
    let pb = bar(layers.saturating_sub(i).div_ceil(n), "scoring", "layers", quiet);
    let started = Instant::now();
    let before = cache.len();
    let scores =
        qanalyze::enable_one_cached(sim, reference, metric, cache, &mut advance(&pb)).map_err(user)?;
    pb.finish_and_clear();
    say!(
        "enable-one shard {i}/{n}: {} of {layers} layers ({} scored now) in {:.1} s, kept in {}",
        scores.len(),
        cache.len() - before,
        started.elapsed().as_secs_f64(),
        cache.path().display()
    );
    crate::summary(serde_json::json!({
        "command": "enable-one shard",
        "shard": [i, n],
        "layers": scores.iter().map(|l| serde_json::json!([l.layer, l.score])).collect::<Vec<_>>(),
        "cache": cache.path().display().to_string(),
    }));
    Ok(())
}

/// Parses `--shard`, reading the environment for `auto`.
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    shard_from(s, &|k| std::env::var(k).ok())
}

/// [`parse_shard`] with the environment read through `env`.
fn shard_from(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<(usize, usize), String> {
    let number = |what: &str, v: &str| {
        v.trim().parse::<usize>().map_err(|_| format!("bad shard {what} '{v}' (expected I/N or auto)"))
    };
    let (i, n) = match s.trim() {
        "auto" => auto_shard(None, env)?,
        a if a.starts_with("auto/") => auto_shard(Some(number("count", &a["auto/".len()..])?), env)?,
        _ => {
            let (i, n) = s.split_once('/').ok_or_else(|| format!("expected I/N or auto, got '{s}'"))?;
            (number("index", i)?, number("count", n)?)
        }
    };
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: need 0 ≤ I < N"));
    }
    Ok((i, n))
}

/// The shard of a Slurm array task or a Kubernetes Indexed Job pod.
fn auto_shard(count: Option<usize>, env: &dyn Fn(&str) -> Option<String>) -> Result<(usize, usize), String> {
    let var = |k: &str| -> Result<Option<usize>, String> {
        env(k)
            .map(|v| v.trim().parse::<usize>().map_err(|_| format!("{k}='{v}' is not a number")))
            .transpose()
    };
    if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
        let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let tasks = var("SLURM_ARRAY_TASK_COUNT")?
            .ok_or("--shard auto: SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT")?;
        let n = count.unwrap_or(tasks);
        if n != tasks {
            return Err(format!("--shard auto/{n}: the Slurm array has {tasks} tasks"));
        }
        let i =
            id.checked_sub(min).ok_or("--shard auto: SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
        if i >= n {
            return Err(format!(
                "--shard auto: array task {id} is not among {n} consecutive ones from {min} (use --array=0-{})",
                n - 1
            ));
        }
        return Ok((i, n));
    }
    if let Some(i) = var("JOB_COMPLETION_INDEX")? {
        let n = count
            .ok_or("--shard auto in a Kubernetes Indexed Job: give the count, auto/N (N = completions)")?;
        return Ok((i, n));
    }
    Err("--shard auto: neither a Slurm array task (SLURM_ARRAY_TASK_ID) nor a Kubernetes Indexed Job \
         (JOB_COMPLETION_INDEX); give I/N"
        .into())
}

#[cfg(test)]
mod tests {
    use super::shard_from;

    fn with(vars: &[(&str, &str)], s: &str) -> Result<(usize, usize), String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        shard_from(s, &|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn explicit_shards_and_their_errors() {
        assert_eq!(with(&[], "2/5"), Ok((2, 5)));
        assert!(with(&[], "5/5").unwrap_err().contains("need 0 ≤ I < N"));
        assert!(with(&[], "x/5").unwrap_err().contains("bad shard index 'x'"));
        assert!(with(&[], "3").unwrap_err().contains("expected I/N or auto"));
    }

    #[test]
    fn slurm_arrays_count_from_their_first_task() {
        let slurm =
            [("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert_eq!(with(&slurm, "auto"), Ok((2, 4)));
        assert_eq!(with(&slurm, "auto/4"), Ok((2, 4)));
        assert!(with(&slurm, "auto/3").unwrap_err().contains("has 4 tasks"));
        let stepped =
            [("SLURM_ARRAY_TASK_ID", "8"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert!(with(&stepped, "auto").unwrap_err().contains("--array=0-2"));
        let bad = [("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert!(with(&bad, "auto").unwrap_err().contains("SLURM_ARRAY_TASK_ID='x'"));
    }

    #[test]
    fn kubernetes_indexed_jobs_need_the_count() {
        let k8s = [("JOB_COMPLETION_INDEX", "1")];
        assert_eq!(with(&k8s, "auto/3"), Ok((1, 3)));
        assert!(with(&k8s, "auto").unwrap_err().contains("auto/N"));
        assert!(with(&[("JOB_COMPLETION_INDEX", "3")], "auto/3").unwrap_err().contains("need 0 ≤ I < N"));
        assert!(with(&[], "auto").unwrap_err().contains("give I/N"));
    }
}
