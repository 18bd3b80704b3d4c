//! Phase-2 searches (spec §7.7): find the longest prefix of the accuracy list whose cumulative
//! application still scores at least the target, evaluating points lazily. Scores are assumed
//! non-increasing along the list; the searches are AIMET's Binary, Interpolation and BruteForce,
//! in the same order of evaluations. And the Pareto filter over evaluated points.

/// How phase 2 looks for the point that meets the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchAlgo {
    /// Bisection on the list (AIMET's default).
    #[default]
    Binary,
    /// Like Binary with the split interpolated between the scores at the ends.
    Interpolation,
    /// Every point from the start until one falls below the target.
    BruteForce,
}

impl std::str::FromStr for SearchAlgo {
    type Err = String;
    fn from_str(s: &str) -> Result<SearchAlgo, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "binary" => Ok(SearchAlgo::Binary),
            "interpolation" => Ok(SearchAlgo::Interpolation),
            "bruteforce" => Ok(SearchAlgo::BruteForce),
            _ => Err(format!("unknown search '{s}': binary, interpolation or brute_force")),
        }
    }
}

/// The index `i` of the point to apply (points `0..=i` of the list), given `n` points, the
/// `target` score and `eval(i)`, the score of point `i`.
pub fn search<E>(
    algo: SearchAlgo,
    n: usize,
    target: f64,
    eval: &mut dyn FnMut(usize) -> Result<f64, E>,
) -> Result<usize, E> {
    if n == 0 {
        return Ok(0);
    }
    if algo == SearchAlgo::BruteForce {
        for i in 0..n {
            let v = eval(i)?;
            if v == target {
                return Ok(i);
            }
            if v < target {
                return Ok(i.saturating_sub(1));
            }
        }
        return Ok(n - 1);
    }
    // On the reversed list `r[j] = v[n − 1 − j]`, ascending.
    let mut r = |j: usize| eval(n - 1 - j);
    let (mut lo, mut hi) = (0usize, n - 1);
    let (mut r_lo, mut r_hi) = (r(lo)?, f64::NAN);
    if target <= r_lo {
        return Ok(n - 1 - lo);
    }
    if hi > lo {
        r_hi = r(hi)?;
        if target >= r_hi {
            return Ok(n - 1 - hi);
        }
    }
    while hi - lo > 1 {
        let mid = match algo {
            SearchAlgo::Interpolation if r_hi != r_lo => {
                let f = (target - r_lo) / (r_hi - r_lo);
                (lo as f64 + (hi - lo) as f64 * f) as usize
            }
            _ => (lo as f64 + 0.5 * (hi - lo) as f64) as usize,
        }
        .clamp(lo + 1, hi - 1);
        let v = r(mid)?;
        if v < target {
            (lo, r_lo) = (mid, v);
        } else if v > target {
            (hi, r_hi) = (mid, v);
        } else {
            (lo, hi, r_lo) = (mid, mid, v);
        }
    }
    let j = if r_lo >= target { lo } else { hi };
    Ok(n - 1 - j)
}

/// Indices of the points no other point beats in both bit-ops (lower is better) and score
/// (higher is better), by ascending bit-ops.
pub fn pareto_indices(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(points[b].1.total_cmp(&points[a].1)));
    let mut best = f64::NEG_INFINITY;
    let mut out = Vec::new();
    for i in order {
        if points[i].1 > best {
            best = points[i].1;
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(algo: SearchAlgo, v: &[f64], target: f64) -> (usize, Vec<usize>) {
        let mut seen = Vec::new();
        let i = search::<()>(algo, v.len(), target, &mut |i| {
            seen.push(i);
            Ok(v[i])
        })
        .unwrap();
        (i, seen)
    }

    #[test]
    fn all_searches_find_the_last_point_at_or_above_target() {
        let v = [0.90, 0.90, 0.89, 0.89, 0.88, 0.85, 0.80, 0.50, 0.10];
        let algos = [SearchAlgo::Binary, SearchAlgo::Interpolation, SearchAlgo::BruteForce];
        for target in [0.95, 0.895, 0.889, 0.86, 0.5, 0.2, 0.0] {
            let want = v.iter().rposition(|&x| x >= target).unwrap_or(0);
            for algo in algos {
                assert_eq!(run(algo, &v, target).0, want, "{algo:?} target {target}");
            }
        }
        // A score equal to the target stops the search at that point (which one, among equal
        // scores, depends on the order of evaluation — as in AIMET).
        for target in [0.90, 0.89, 0.88] {
            for algo in algos {
                assert_eq!(v[run(algo, &v, target).0], target, "{algo:?} target {target}");
            }
        }
    }

    #[test]
    fn binary_evaluates_all_flipped_first_then_nothing_flipped() {
        let v = [0.9, 0.8, 0.7, 0.6, 0.5];
        let (_, seen) = run(SearchAlgo::Binary, &v, 0.75);
        assert_eq!(&seen[..2], &[4, 0]);
        assert!(seen.len() <= 4);
    }

    #[test]
    fn pareto_keeps_non_dominated_points() {
        let pts = [(1.0, 0.9), (0.5, 0.9), (0.4, 0.7), (0.6, 0.8), (0.3, 0.75)];
        assert_eq!(pareto_indices(&pts), vec![4, 1]);
    }
}
