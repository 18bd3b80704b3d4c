//! `qmix qat`: `qmix quantsim`'s job with quantization-aware training between calibration and
//! the outputs — regular QAT or range learning on the calibration samples, against their labels
//! or, without labels, by distillation from the FP32 model — so the written model, encodings and
//! QDQ export are the fine-tuned ones. A checkpoint beside the output folder is written after
//! every epoch; `--resume` continues from it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use qcalib::QuantSim;
use qgraph::Tensor;
use qtrain::{Objective, QatMode, QatOptions, Schedule, TrainingData};

use crate::Failure;
use crate::dataset::{Dataset, EvalArgs, Preprocess, SampleAxes, bar, read_labels, user};

/// The training settings of `qmix qat`.
#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// `regular` (weights learn; weight encodings follow them, activation encodings stay as
    /// calibrated) or `range-learning` (every quantizer's scale and offset learn too).
    #[arg(long, default_value = "regular", value_parser = parse_mode)]
    mode: QatMode,
    /// Passes over the calibration samples.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    epochs: u32,
    /// Adam's learning rate, in units of each parameter's quantization step (a bias: its
    /// layer's output step), so one rate suits layers whose folded weights differ in size.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Learning-rate schedule: cosine (to zero over the training) or constant.
    #[arg(long, default_value = "cosine", value_parser = parse_schedule)]
    schedule: Schedule,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    train_batch: u32,
    /// Samples per forward/backward pass (gradients add up to the step's); bounds memory.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch: u32,
    /// Class labels (.npy of integers) of the calibration samples: train with cross-entropy
    /// against them instead of distilling from the FP32 model.
    #[arg(long)]
    calib_labels: Option<PathBuf>,
    /// Without labels: `kl` (distillation from the FP32 outputs' softmax, for class scores) or
    /// `mse` (to the FP32 outputs, for anything else).
    #[arg(long, default_value = "kl", value_parser = ["kl", "mse"])]
    distill: String,
    /// Softmax temperature of the distillation.
    #[arg(long, default_value_t = 4.0)]
    temperature: f32,
    /// Largest global gradient norm (larger gradients are scaled down).
    #[arg(long)]
    clip_grad_norm: Option<f32>,
    /// Seed of the per-epoch shuffle of the samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The checkpoint file written after every epoch (default: OUT.qat.ckpt beside the output
    /// folder).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint when it exists (it must come from the same settings).
    #[arg(long)]
    resume: bool,
    /// Recompute the forward values in this many segments for the backward pass: memory falls
    /// to about one segment's values, for about one more forward pass; the gradients are the
    /// same. Default: 1, or as many as it takes for one micro-batch's values to fit in
    /// --max-memory
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    segments: Option<u32>,
    /// Leave BatchNormalizations as they are after training (by default their statistics are
    /// re-estimated on the trained simulation and they are folded into their layers, each folded
    /// weight keeping its integer: AIMET's BN re-estimation and fold to scale)
    #[arg(long)]
    keep_batch_norms: bool,
    /// The model whose outputs distillation targets (default: the model as given, before any
    /// post-training technique changed it); it must take the same inputs
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Augment every training batch's images (each 4-D float input, channels as --layout
    /// says): a random left-right flip and a random crop of --crop-area..1 of the image resized
    /// back; distillation's targets are computed on the augmented images
    #[arg(long)]
    augment: bool,
    /// With --augment: the smallest share of an image's area a crop keeps (1: flips only)
    #[arg(long, default_value_t = 0.5, requires = "augment", value_parser = parse_crop_area)]
    crop_area: f32,
}

fn parse_crop_area(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("'{s}' is not a share of the area in (0, 1]")),
    }
}

fn parse_mode(s: &str) -> Result<QatMode, String> {
    match s {
        "regular" => Ok(QatMode::Regular),
        "range-learning" => Ok(QatMode::RangeLearning),
        _ => Err(format!("unknown mode '{s}' (regular, range-learning)")),
    }
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    match s {
        "cosine" => Ok(Schedule::Cosine),
        "constant" => Ok(Schedule::Constant),
        _ => Err(format!("unknown schedule '{s}' (cosine, constant)")),
    }
}

/// Arguments of `qmix qat`.
#[derive(clap::Args)]
pub struct QatArgs {
    #[command(flatten)]
    job: crate::quantsim::QuantsimArgs,
    #[command(flatten)]
    training: TrainArgs,
}

pub fn run(a: QatArgs) -> Result<(), Failure> {
    crate::quantsim::run_job(a.job, Some(&a.training))
}

/// Where the job's data lives, for training.
pub(crate) struct TrainingInputs<'a> {
    pub calib: &'a Dataset,
    /// The FP32 model as given (before any post-training technique), distillation's teacher.
    pub teacher: Option<&'a qgraph::Model>,
    pub evaluation: &'a EvalArgs,
    pub preprocess: &'a Preprocess,
    pub out: &'a Path,
    pub quiet: bool,
}

/// Trains `sim` (calibrated) as `t` says; returns the report as JSON.
pub(crate) fn train(
    t: &TrainArgs,
    sim: &mut QuantSim,
    inputs: TrainingInputs<'_>,
) -> Result<serde_json::Value, Failure> {
    let calib = inputs.calib;
    if let Some(name) = calib.input_without_leading_samples() {
        return Err(user(anyhow::anyhow!(
            "qat stacks samples along axis 0, but input '{name}' keeps them elsewhere"
        )));
    }
    let samples: Vec<qcalib::Feeds> = calib.batches(1).collect::<Result<_, _>>()?;
    let labels = match &t.calib_labels {
        Some(path) => {
            let labels = read_labels(path)?;
            if labels.len() != calib.samples {
                return Err(user(anyhow::anyhow!(
                    "{}: {} labels for {} calibration samples",
                    path.display(),
                    labels.len(),
                    calib.samples
                )));
            }
            let offset = inputs.evaluation.label_offset;
            Some(
                labels
                    .iter()
                    .map(|&l| usize::try_from(l).map(|l| l + offset))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| user(anyhow::anyhow!("{}: a negative label", path.display())))?,
            )
        }
        None => None,
    };
    let objective = match (&labels, t.distill.as_str()) {
        (Some(_), _) => Objective::CrossEntropy,
        (None, "mse") => Objective::Mse,
        (None, _) => Objective::Distillation { temperature: t.temperature },
    };
    let micro = (t.micro_batch as usize).max(1);
    let segments = match t.segments {
        Some(n) => n as usize,
        None => {
            let first = samples.first().ok_or_else(|| user(anyhow::anyhow!("no calibration samples")))?;
            let bytes = qtrain::kept_bytes_per_sample(sim, first).map_err(user)?.saturating_mul(micro);
            let budget = qexec::default_max_tensor_bytes().max(1);
            let n = bytes.div_ceil(budget).max(1);
            if n > 1 {
                say!(
                    "a micro-batch of {micro} keeps {:.0} MiB for its backward pass, over --max-memory ({:.0} MiB): its values are recomputed in {n} segments",
                    bytes as f64 / (1 << 20) as f64,
                    budget as f64 / (1 << 20) as f64
                );
            }
            n
        }
    };
    let options = QatOptions {
        segments,
        mode: t.mode,
        epochs: t.epochs as usize,
        batch_size: t.train_batch as usize,
        micro_batch: t.micro_batch as usize,
        learning_rate: t.lr,
        schedule: t.schedule,
        clip_grad_norm: t.clip_grad_norm,
        objective,
        seed: t.seed,
        augmentation: t.augment.then_some(qtrain::Augmentation {
            flip: true,
            min_crop_area: t.crop_area,
            layout: match inputs.preprocess.layout {
                crate::images::Layout::Nchw => qtrain::ImageLayout::Nchw,
                crate::images::Layout::Nhwc => qtrain::ImageLayout::Nhwc,
            },
        }),
    };
    let checkpoint = t.checkpoint.clone().unwrap_or_else(|| {
        let name =
            inputs.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "qat".into());
        inputs.out.with_file_name(format!("{name}.qat.ckpt"))
    });
    let evaluation = Evaluation::load(inputs.evaluation, inputs.preprocess, sim)?;
    let steps = calib.samples.div_ceil(options.batch_size) * options.epochs;
    let pb = bar(steps, "training", "steps", inputs.quiet);
    let started = Instant::now();
    say!(
        "QAT ({}): {} epochs over {} samples, {}, learning rate {} ({:?}), checkpoint {}",
        t.mode.as_str(),
        t.epochs,
        calib.samples,
        match objective {
            Objective::CrossEntropy => "cross-entropy against the calibration labels".to_string(),
            Objective::Distillation { temperature } =>
                format!("distillation from FP32 at temperature {temperature}"),
            Objective::Mse => "MSE to the FP32 outputs".to_string(),
        },
        t.lr,
        t.schedule,
        checkpoint.display()
    );
    // Each epoch's line is printed as it ends: with its score when there is an evaluation.
    let current = std::cell::Cell::new((0usize, f64::NAN));
    let mut progress = |p: &qtrain::Progress| {
        pb.set_position(((p.epoch - 1) * p.steps + p.step) as u64);
        pb.set_prefix(format!("steps, epoch {}/{}, loss {:.4}", p.epoch, p.epochs, p.loss));
        current.set((p.epoch, p.loss));
        if p.step == p.steps && evaluation.is_none() {
            pb.suspend(|| say!("  epoch {}: loss {:.5}", p.epoch, p.loss));
        }
    };
    let loaded_teacher = match &t.teacher {
        Some(path) => Some(qgraph::load_path(path)?),
        None => None,
    };
    let teacher = loaded_teacher.as_ref().or(inputs.teacher);
    let data = TrainingData { samples: &samples, labels: labels.as_deref(), teacher };
    let report = match evaluation.as_ref() {
        Some(e) => {
            let pb = &pb;
            let current = &current;
            let mut score = |s: &QuantSim| -> qtrain::Result<f64> {
                let top1 = e.top1(s)?;
                match current.get() {
                    (0, _) => pb.suspend(|| say!("  before training: top-1 {top1:.4}")),
                    (epoch, loss) => pb.suspend(|| say!("  epoch {epoch}: loss {loss:.5}, top-1 {top1:.4}")),
                }
                Ok(top1)
            };
            qtrain::train(sim, data, &options, Some((&checkpoint, t.resume)), Some(&mut score), &mut progress)
        }
        None => qtrain::train(sim, data, &options, Some((&checkpoint, t.resume)), None, &mut progress),
    }
    .map_err(|e| match e {
        qtrain::TrainError::Grad(qgrad::GradError::NonFinite { .. }) => user(anyhow::anyhow!(
            "{e}; in a normalization decomposed into ReduceMean, Pow, Sqrt and Div, quantizing its internals can round the variance to zero: `--pass LayerNormalization` (or RMSNormalization) keeps them in float"
        )),
        e => user(e),
    })?;
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    say!(
        "trained {} tensors ({} values){} in {seconds:.1} s{}; the simulation holds epoch {}",
        report.trained_tensors,
        report.trained_values,
        match report.learned_quantizers {
            0 => String::new(),
            n => format!(" and {n} quantizers' ranges"),
        },
        report.resumed_after.map(|e| format!(" (resumed after epoch {e})")).unwrap_or_default(),
        report.best_epoch
    );
    let mut json = report.to_json();
    if !t.keep_batch_norms {
        let batches: Vec<qcalib::Feeds> = calib.batches(options.batch_size).collect::<Result<_, _>>()?;
        let bn = qptq::fold_batch_norms_of_simulation(sim, &batches).map_err(user)?;
        if !bn.folded.is_empty() {
            say!(
                "re-estimated {} batch norms on the trained simulation and folded {} into their layers",
                bn.reestimated.len(),
                bn.folded.len()
            );
            if let Some(map) = json.as_object_mut() {
                map.insert("bn_reestimation".into(), bn.to_json());
            }
        }
    }
    if let Some(map) = json.as_object_mut() {
        map.insert("mode".into(), t.mode.as_str().into());
        map.insert("seconds".into(), seconds.into());
        map.insert("checkpoint".into(), checkpoint.display().to_string().into());
    }
    Ok(json)
}

/// The evaluation data and labels, scored after every epoch.
struct Evaluation {
    data: Dataset,
    labels: Vec<i64>,
    offset: usize,
    batch: usize,
}

impl Evaluation {
    fn load(e: &EvalArgs, preprocess: &Preprocess, sim: &QuantSim) -> Result<Option<Evaluation>, Failure> {
        let (false, Some(labels)) = (e.eval.is_empty(), &e.labels) else { return Ok(None) };
        let data = Dataset::load(&e.eval, preprocess, &SampleAxes::of(sim.model())).map_err(Failure::User)?;
        let labels = read_labels(labels)?;
        if labels.len() != data.samples {
            return Err(user(anyhow::anyhow!("{} labels for {} samples", labels.len(), data.samples)));
        }
        Ok(Some(Evaluation { data, labels, offset: e.label_offset, batch: 32 }))
    }

    /// Top-1 of the simulation (the labels are checked against its scores on the first batch).
    fn top1(&self, sim: &QuantSim) -> qtrain::Result<f64> {
        let run = |feeds: &[(&str, Tensor)]| sim.run(feeds).map_err(user);
        crate::dataset::top1(&self.data, &self.labels, self.batch, self.offset, &run)
            .map_err(|f| qtrain::TrainError::Data(f.to_string()))
    }
}
