//! Budget-optimal mixed precision, beyond AIMET's greedy walk: from the phase-1 scores, predict the
//! damage of any per-group assignment and find, for every bit-ops budget, the assignment with the
//! least predicted damage — an exact multiple-choice knapsack over the groups.
//!
//! Prediction: a phase-1 score `s` (dB, higher is better) of group `g` at candidate `c` stands for
//! a noise-to-signal ratio `10^(−s/10)`; noises of different groups add. AIMET's AMP SQNR is an
//! affine function of the noise power, so the sum ranks assignments the same way. A group at the
//! starting candidate adds nothing.
//!
//! Solver: dynamic programming over the groups with the bit-ops axis cut into `resolution` steps;
//! each group's cost is rounded *up* to whole steps, so every plan the DP returns truly fits its
//! budget, and the optimum is exact for the rounded costs. One table yields the best plan for
//! every budget at once; the plans that no cheaper plan beats form the predicted front.

use crate::bitops::BitOps;
use crate::candidate::Candidate;

/// One plan of the predicted front.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Candidate per group.
    pub assignment: Vec<Candidate>,
    /// Bit-ops relative to the starting point.
    pub relative_bitops: f64,
    /// Predicted noise-to-signal ratio (sum over groups; lower is better).
    pub predicted_noise: f64,
}

/// The predicted Pareto front, cheapest plan first. `options[g]` lists group `g`'s candidates with
/// their phase-1 scores (the starting candidate, without a score, is added here).
pub fn predicted_front(
    options: &[Vec<(Candidate, f64)>],
    starting: &[Candidate],
    bitops: &BitOps,
    resolution: usize,
) -> Vec<Plan> {
    let start_total = bitops.total(starting);
    if start_total <= 0.0 || options.is_empty() {
        return Vec::new();
    }
    // Choices per group: (candidate, cost, noise).
    let choices: Vec<Vec<(Candidate, f64, f64)>> = options
        .iter()
        .zip(starting)
        .enumerate()
        .map(|(g, (opts, &start))| {
            let mut v = vec![(start, bitops.group_cost(g, start), 0.0)];
            for &(c, score) in opts {
                if c != start {
                    v.push((c, bitops.group_cost(g, c), 10f64.powf(-score / 10.0)));
                }
            }
            v
        })
        .collect();
    let max_cost: f64 = choices.iter().map(|v| v.iter().map(|c| c.1).fold(0.0, f64::max)).sum();
    let step = (max_cost / resolution.max(1) as f64).max(f64::MIN_POSITIVE);
    let steps = |cost: f64| (cost / step - 1e-9).ceil().max(0.0) as usize;
    let width = choices.iter().map(|v| v.iter().map(|c| steps(c.1)).max().unwrap_or(0)).sum::<usize>() + 1;
    // best[b] = least noise with rounded cost exactly b; pick[g][b] = the choice of group g.
    let mut best = vec![f64::INFINITY; width];
    best[0] = 0.0;
    let mut pick: Vec<Vec<u8>> = Vec::with_capacity(choices.len());
    for v in &choices {
        let mut next = vec![f64::INFINITY; width];
        let mut chosen = vec![u8::MAX; width];
        for (b, &noise) in best.iter().enumerate() {
            if !noise.is_finite() {
                continue;
            }
            for (k, &(_, cost, n)) in v.iter().enumerate() {
                let nb = b + steps(cost);
                if nb < width && noise + n < next[nb] {
                    next[nb] = noise + n;
                    chosen[nb] = k as u8;
                }
            }
        }
        best = next;
        pick.push(chosen);
    }
    let fixed = bitops.fixed_cost();
    let mut front = Vec::new();
    let mut least = f64::INFINITY;
    for (b, &noise) in best.iter().enumerate() {
        if noise >= least || noise.is_nan() {
            continue;
        }
        least = noise;
        // Walk back through the choices.
        let mut assignment = vec![starting[0]; choices.len()];
        let mut at = b;
        for g in (0..choices.len()).rev() {
            let k = pick[g][at] as usize;
            let (c, cost, _) = choices[g][k];
            assignment[g] = c;
            at -= steps(cost);
        }
        let exact: f64 =
            assignment.iter().enumerate().map(|(g, &c)| bitops.group_cost(g, c)).sum::<f64>() + fixed;
        front.push(Plan { assignment, relative_bitops: exact / start_total, predicted_noise: noise });
    }
    front
}

/// Area between two score-versus-bit-ops fronts over the bit-ops range both cover: the integral of
/// (best score of `a` at or below x) − (same for `b`). Positive: `a` is better.
pub fn area_between(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    let staircase = |pts: &[(f64, f64)], x: f64| -> Option<f64> {
        pts.iter()
            .filter(|p| p.0 <= x + 1e-12)
            .map(|p| p.1)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
    };
    let lo = |pts: &[(f64, f64)]| pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let hi = |pts: &[(f64, f64)]| pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (start, end) = (lo(a).max(lo(b)), hi(a).min(hi(b)));
    if start.partial_cmp(&end) != Some(std::cmp::Ordering::Less) {
        return 0.0;
    }
    let mut xs: Vec<f64> = a.iter().chain(b).map(|p| p.0).filter(|&x| x >= start && x <= end).collect();
    xs.extend([start, end]);
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    xs.windows(2)
        .map(|w| match (staircase(a, w[0]), staircase(b, w[0])) {
            (Some(sa), Some(sb)) => (sa - sb) * (w[1] - w[0]),
            _ => 0.0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_between_staircases() {
        let a = [(0.2, 0.8), (0.5, 0.9), (1.0, 0.9)];
        let b = [(0.3, 0.7), (1.0, 0.9)];
        // Over [0.3, 1.0]: a is 0.8 on [0.3, 0.5) and 0.9 after; b is 0.7 until 1.0.
        let want = 0.1 * 0.2 + 0.2 * 0.5;
        assert!((area_between(&a, &b) - want).abs() < 1e-12);
        assert!((area_between(&b, &a) + want).abs() < 1e-12);
    }
}
