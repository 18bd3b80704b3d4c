//! What the job commands share: evaluation options, `.npy` datasets (named arrays with samples along axis 0) sliced
//! into batches, progress bars that `--quiet` hides, user errors, and top-1 predictions.

use std::path::{Path, PathBuf};

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use qcalib::QuantsimConfig;
use qgraph::Tensor;

use crate::npy_rows::NpyRows;
use crate::{Failure, read_tensor};

/// Loads a job's model with the inputs `binds` names made constants (`--bind`), then every `If`
/// whose condition is known at load time (a constant, a shape check on declared dims, or one on a
/// bound input) replaced by the branch it takes, so that branch's layers are quantized, analysed
/// and exported one by one (`qgraph::passes::inline_static_ifs`).
pub(crate) fn load_model(path: &Path, binds: &[Bind], quiet: bool) -> Result<qgraph::Model, Failure> {
    let mut model = qgraph::load_path(path)?;
    for bind in binds {
        model.graph.bind_input_numbers(&bind.name, &bind.values)?;
    }
    let inlined = qgraph::passes::inline_static_ifs(&mut model, &qgraph::DimBindings::default())?;
    if inlined > 0 && !quiet {
        say!("note: {inlined} If node(s) with a condition known at load time replaced by the branch taken");
    }
    Ok(model)
}

/// `--bind NAME=V[,V…]`: a graph input fixed to a value for the whole job.
#[derive(Debug, Clone)]
pub(crate) struct Bind {
    name: String,
    values: Vec<f64>,
}

/// Parses `--bind NAME=V[,V…]`.
pub(crate) fn parse_bind(s: &str) -> Result<Bind, String> {
    let (name, list) = s.split_once('=').ok_or_else(|| format!("expected NAME=V[,V…], got '{s}'"))?;
    let values = list
        .split(',')
        .map(|v| v.trim().parse::<f64>().map_err(|_| format!("--bind {name}: '{v}' is not a number")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Bind { name: name.to_string(), values })
}

/// Evaluation options shared by the job commands.
#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// Evaluation data, NAME=FILE.npy (repeatable).
    #[arg(long = "eval", value_parser = crate::parse_input)]
    pub eval: Vec<(String, PathBuf)>,
    /// Class labels (.npy of integers) for the evaluation data: prints top-1.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Index of class 0 in the model's scores (1 for 1001-class ImageNet models).
    #[arg(long, default_value_t = 0)]
    pub label_offset: usize,
}

/// The default weight and activation precisions of a simulation.
#[derive(clap::Args)]
pub(crate) struct PrecisionArgs {
    /// Parameter precision: int4..int16, fp16, bf16.
    #[arg(long, default_value = "int8", value_parser = crate::quantsim::parse_precision)]
    pub param: qcalib::Precision,
    /// Activation precision.
    #[arg(long = "act", default_value = "int8", value_parser = crate::quantsim::parse_precision)]
    pub activation: qcalib::Precision,
}

impl PrecisionArgs {
    /// As the simulation's default precision.
    pub fn default_precision(&self) -> qcalib::DefaultPrecision {
        qcalib::DefaultPrecision { param: self.param, activation: self.activation }
    }
}

/// What every job command takes: the model, its calibration data, batch size, config and scheme.
#[derive(clap::Args)]
pub(crate) struct JobArgs {
    /// The FP32 ONNX model.
    pub model: PathBuf,
    /// Fix a graph input to a value for the whole job, NAME=V[,V…] (repeatable): the model is
    /// specialised for it (a sample rate, a mode flag) and exported without that input.
    #[arg(long = "bind", value_parser = crate::dataset::parse_bind)]
    pub binds: Vec<Bind>,
    /// Calibration data for a graph input, NAME=FILE.npy with samples along axis 0 (repeatable).
    /// Default: `<model>_calib.npy` beside the model, for its first input (and likewise
    /// `<model>_eval.npy` and `<model>_labels.npy` for evaluation when present).
    #[arg(long = "calib", value_parser = crate::parse_input)]
    pub calib: Vec<(String, PathBuf)>,
    /// Samples per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Quantsim config: a preset (default, default_per_tensor, htp_v73) or a JSON file.
    #[arg(long, default_value = "default")]
    pub config: String,
    /// A graph pass to apply on top of the config's `supergroup_pass_list` (repeatable):
    /// MaskedSoftmax, MatmulAdd, LayerNormalization, RMSNormalization.
    #[arg(long = "pass")]
    pub passes: Vec<String>,
    /// Calibration scheme: min_max, tf_enhanced, percentile, percentile:P, mse or entropy.
    #[arg(long, default_value = "min_max", value_parser = crate::quantsim::parse_scheme)]
    pub scheme: qcalib::Scheme,
    #[command(flatten)]
    pub preprocess: Preprocess,
    /// Memory for the FP32 value of every tensor, kept so that each layer's run recomputes only
    /// what lies below it, in MiB. When the scored samples need more, analyze, litemp and automp
    /// walk each sample's FP32 pass alongside the layers, in windows of samples whose working
    /// sets fit; amp and autoquant run their simulations in full. Default: 128 for analyze,
    /// litemp and automp, 4096 for amp and autoquant.
    #[arg(long = "fp32-cache-mib")]
    pub fp32_cache_mib: Option<usize>,
    #[command(flatten)]
    pub ptq: crate::ptq::PtqArgs,
    #[command(flatten)]
    pub learned_rounding: crate::ptq::RoundingArgs,
    #[command(flatten)]
    pub blocks: BlockArgs,
}

/// Blockwise (and LPBQ) weights.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct BlockArgs {
    /// Blockwise weights: Conv, Gemm and MatMul weights get one encoding per output channel and
    /// block of this many input channels, symmetric at the --param precision (AIMET's
    /// set_blockwise_quantization_for_weights); weights the size does not divide keep theirs.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub block_size: Option<u32>,
    /// LPBQ (AIMET's low-power blockwise quantization, with --block-size): each block's scale
    /// becomes an integer of (N − --param bits) bits times one float scale per output channel,
    /// N being the bitwidth a runtime decompresses the weights to (8 for int4 weights)
    #[arg(long, requires = "block_size", value_parser = clap::value_parser!(u32).range(2..=16))]
    pub lpbq: Option<u32>,
}

impl BlockArgs {
    /// Makes `sim`'s weights blockwise at the `param` precision (and LPBQ) when asked.
    pub(crate) fn apply(&self, sim: &mut qcalib::QuantSim, param: qcalib::Precision) -> Result<(), Failure> {
        let Some(block) = self.block_size else { return Ok(()) };
        let bits = match param {
            qcalib::Precision::Int(bits) => bits,
            other => return Err(user(anyhow::anyhow!("--block-size needs an integer --param, not {other}"))),
        };
        let skipped = sim
            .set_blockwise_weights(&["Conv", "Gemm", "MatMul"], bits, true, block as usize)
            .map_err(user)?;
        say!("blockwise weights, blocks of {block}: {} weights kept their quantizer", skipped.len());
        for (name, why) in &skipped {
            say!("  {name}: {why}");
        }
        if let Some(decompressed) = self.lpbq {
            let n = sim.set_lpbq(decompressed).map_err(user)?;
            say!(
                "LPBQ: {n} blockwise weights' block scales as {}-bit integers of a per-channel scale",
                decompressed.saturating_sub(bits)
            );
        }
        Ok(())
    }
}

impl JobArgs {
    /// [`JobArgs::fp32_cache_mib`] in bytes, `default_mib` MiB when not given.
    pub fn fp32_cache_bytes(&self, default_mib: usize) -> usize {
        self.fp32_cache_mib.unwrap_or(default_mib).saturating_mul(1 << 20)
    }
}

/// The quantsim config `name` (preset or JSON file) with the extra graph `passes`.
pub(crate) fn quantsim_config(name: &str, passes: &[String]) -> Result<QuantsimConfig, Failure> {
    let mut config = QuantsimConfig::load(name).map_err(user)?;
    for pass in passes {
        config.add_pass(pass).map_err(user)?;
    }
    Ok(config)
}

/// How integer data (e.g. u8 images) becomes a float model input; float data is used as it is.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct Preprocess {
    /// Integer data: x = (raw + OFFSET) · SCALE.
    #[arg(long, requires = "scale", allow_hyphen_values = true, value_parser = crate::parse_finite_f32)]
    pub offset: Option<f32>,
    /// See --offset (without it, x = raw · SCALE).
    #[arg(long, value_parser = crate::parse_finite_f32)]
    pub scale: Option<f32>,
    /// Integer image data, channels on axis 1 (NCHW) or last (NHWC): x = (raw / 255 − mean) / std, per channel;
    /// comma-separated, one value per channel or one for all (e.g. 0.485,0.456,0.406).
    #[arg(long, value_delimiter = ',', conflicts_with = "scale", requires = "std", value_parser = crate::parse_finite_f32)]
    pub mean: Vec<f32>,
    /// See --mean.
    #[arg(long, value_delimiter = ',', requires = "mean", value_parser = crate::parse_finite_f32)]
    pub std: Vec<f32>,
    /// Image folders: side of the centre crop.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Image folders: the shorter side is resized to this first (default: image size · 256/224).
    #[arg(long)]
    pub resize: Option<u32>,
    /// Image folders and `qat --augment`: NCHW or NHWC batches.
    #[arg(long, value_enum, default_value_t = crate::images::Layout::Nchw)]
    pub layout: crate::images::Layout,
}

impl Preprocess {
    /// Whether data is used as it is.
    fn is_identity(&self) -> bool {
        self.scale.is_none() && self.mean.is_empty()
    }

    /// Checks that the raw data `t` of `file` can be preprocessed: integer data, one mean and
    /// std per channel (or one for all), no zero std, and finite results for its extremes.
    fn check(&self, t: &Tensor, file: &Path) -> anyhow::Result<()> {
        if self.is_identity() {
            return Ok(());
        }
        if t.dtype().is_float() {
            bail!(
                "{} holds {} data, which is used as it is: --scale/--offset and --mean/--std apply to integer (raw image) data only",
                file.display(),
                t.dtype()
            );
        }
        let (mean, std) = self.per_channel(t.shape(), file)?;
        if let Some(c) = std.iter().position(|&s| s == 0.0) {
            bail!("--std is 0 for channel {c}");
        }
        for v in integer_extremes(t).into_iter().flatten().map(|v| v as f32) {
            let finite = match self.scale {
                Some(scale) => ((v + self.offset.unwrap_or(0.0)) * scale).is_finite(),
                None => mean.iter().zip(&std).all(|(m, s)| ((v / 255.0 - m) / s).is_finite()),
            };
            if !finite {
                bail!("{}: the value {v} does not stay finite once preprocessed", file.display());
            }
        }
        Ok(())
    }

    /// The channel count of data of `shape` (axis 1 for NCHW, the last for NHWC) and its mean
    /// and std per channel.
    fn per_channel(&self, shape: &[usize], file: &Path) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let nhwc = self.layout == crate::images::Layout::Nhwc;
        let channels = if nhwc { shape.last() } else { shape.get(1) }.copied().unwrap_or(1);
        let per = |list: &[f32], what: &str| -> anyhow::Result<Vec<f32>> {
            match list.len() {
                0 => Ok(Vec::new()),
                1 => Ok(vec![list[0]; channels]),
                n if n == channels => Ok(list.to_vec()),
                n => bail!("{}: --{what} has {n} values for {channels} channels", file.display()),
            }
        };
        Ok((per(&self.mean, "mean")?, per(&self.std, "std")?))
    }

    /// `t` as the model sees it (data [`Preprocess::check`] accepted, or a slice of it along its
    /// first axis).
    fn transform(&self, t: &Tensor) -> Tensor {
        if self.is_identity() {
            return t.clone();
        }
        let shape = t.shape().to_vec();
        let mut values: Vec<f32> = t.to_f64_vec().into_iter().map(|v| v as f32).collect();
        if let Some(scale) = self.scale {
            let offset = self.offset.unwrap_or(0.0);
            values.iter_mut().for_each(|v| *v = (*v + offset) * scale);
        } else {
            let nhwc = self.layout == crate::images::Layout::Nhwc;
            let (mean, std) = self.per_channel(&shape, Path::new("")).unwrap_or_default();
            let channels = mean.len().max(1);
            let plane: usize = shape.iter().skip(2).product();
            for (i, v) in values.iter_mut().enumerate() {
                let c = if nhwc { i % channels } else { (i / plane.max(1)) % channels };
                *v = (*v / 255.0 - mean.get(c).copied().unwrap_or(0.0)) / std.get(c).copied().unwrap_or(1.0);
            }
        }
        Tensor::from_vec(&shape, values).expect("the values of a tensor fill its shape")
    }
}

/// The least and greatest element of integer data, read a few rows at a time (no widened copy
/// of the whole tensor).
fn integer_extremes(t: &Tensor) -> [Option<i64>; 2] {
    let rows = t.shape().first().copied().unwrap_or(1);
    let row_len = t.len() / rows.max(1);
    let step = ((1 << 20) / row_len.max(1)).max(1);
    let (mut lo, mut hi) = (None::<i64>, None::<i64>);
    for start in (0..rows).step_by(step) {
        let part = if t.shape().is_empty() {
            Some(t.clone())
        } else {
            t.slice_axis(0, start, step.min(rows - start))
        };
        for v in part.and_then(|p| p.to_i64_vec()).unwrap_or_default() {
            lo = Some(lo.map_or(v, |l| l.min(v)));
            hi = Some(hi.map_or(v, |h| h.max(v)));
        }
    }
    [lo, hi]
}

/// Where a graph input's data keeps its samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SampleAxis {
    /// Along this axis (0 for most inputs; 1 for a recurrent state `[layers, batch, hidden]`).
    Axis(usize),
    /// Nowhere: the same value for every sample (a scalar such as a sample rate).
    Shared,
}

/// The sample axis of each graph input, read from the model's declared input shapes: the dim
/// named like the batch dim of the inputs (the symbol at axis 0 of the first input that has one),
/// else axis 0 when it is not fixed, else the only dim that is not fixed; scalars are shared.
pub(crate) struct SampleAxes(Vec<(String, SampleAxis)>);

impl SampleAxes {
    pub fn of(model: &qgraph::Model) -> SampleAxes {
        use qgraph::Dim;
        let g = &model.graph;
        let shapes: Vec<(String, Option<&[Dim]>)> = g
            .inputs()
            .iter()
            .map(|&v| (g.value(v).name.clone(), g.value(v).shape.as_ref().map(|s| s.0.as_slice())))
            .collect();
        let batch = shapes.iter().find_map(|(_, d)| match d.and_then(|d| d.first()) {
            Some(Dim::Symbol(name)) if !name.is_empty() => Some(name.clone()),
            _ => None,
        });
        let axis_of = |dims: Option<&[Dim]>| -> SampleAxis {
            let Some(dims) = dims else { return SampleAxis::Axis(0) };
            if dims.is_empty() {
                return SampleAxis::Shared;
            }
            if let Some(at) =
                dims.iter().position(|d| matches!((d, &batch), (Dim::Symbol(s), Some(b)) if s == b))
            {
                return SampleAxis::Axis(at);
            }
            let open: Vec<usize> = (0..dims.len()).filter(|&i| dims[i].known().is_none()).collect();
            match open.as_slice() {
                [only] if dims[0].known().is_some() => SampleAxis::Axis(*only),
                _ => SampleAxis::Axis(0),
            }
        };
        SampleAxes(shapes.iter().map(|(n, d)| (n.clone(), axis_of(*d))).collect())
    }

    /// The sample axis of input `name` for data of rank `rank` (a scalar file is shared; data
    /// not matching the declared rank keeps its samples on axis 0).
    fn axis(&self, name: &str, rank: usize) -> SampleAxis {
        match self.0.iter().find(|(n, _)| n == name).map(|(_, a)| *a) {
            _ if rank == 0 => SampleAxis::Shared,
            Some(SampleAxis::Axis(a)) if a < rank => SampleAxis::Axis(a),
            _ => SampleAxis::Axis(0),
        }
    }
}

/// Named arrays with their samples along a per-input axis (or shared), sliced into batches.
pub(crate) struct Dataset {
    /// Per input: its name, its data and where it keeps its samples. Data along axis 0 stays as
    /// given (a `.npy` file stays on disk; integer data stays raw, a quarter of the memory of f32
    /// or less) and each batch is read and preprocessed when it is taken.
    inputs: Vec<(String, Source, SampleAxis)>,
    preprocess: Preprocess,
    /// Samples per input (the same for every input that has samples).
    pub samples: usize,
}

/// Where an input's data is: in memory, or rows of a `.npy` file read when a batch takes them.
enum Source {
    Loaded(Tensor),
    Rows(NpyRows),
}

/// Rows read at a time when a file's data is checked at load.
const ROWS_CHECKED_AT_ONCE_BYTES: usize = 16 << 20;

/// Fails naming the sample of `t` (rows `first..` of `file`) that holds a NaN or an infinity.
fn check_finite(t: &Tensor, name: &str, file: &Path, first: usize, per_sample: usize) -> anyhow::Result<()> {
    // Only float data can hold NaN or Inf; f32 (the common case) is scanned in place.
    let bad = match t.as_f32() {
        Some(a) => a.iter().enumerate().find(|(_, v)| !v.is_finite()).map(|(at, v)| (at, v.is_nan())),
        None if t.dtype().is_float() => t
            .to_f64_vec()
            .into_iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(at, v)| (at, v.is_nan())),
        None => None,
    };
    if let Some((at, nan)) = bad {
        let what = if nan { "NaN" } else { "an infinite value" };
        let sample = first + at / per_sample.max(1);
        bail!(
            "{}: sample {sample} (input '{name}') holds {what}; clean the data or drop that sample",
            file.display()
        );
    }
    Ok(())
}

impl Dataset {
    pub fn load(
        files: &[(String, PathBuf)],
        preprocess: &Preprocess,
        axes: &SampleAxes,
    ) -> anyhow::Result<Dataset> {
        let mut inputs = Vec::new();
        let mut samples = None;
        for (name, file) in files {
            let rows =
                NpyRows::open(file)?.filter(|r| axes.axis(name, r.shape().len()) == SampleAxis::Axis(0));
            let (source, axis, shape) = match rows {
                Some(rows) => {
                    // Checked a few rows at a time, then left in the file.
                    let n = rows.shape()[0];
                    let per_sample: usize = rows.shape()[1..].iter().product();
                    let step = (ROWS_CHECKED_AT_ONCE_BYTES / (per_sample.max(1) * 8)).max(1);
                    for start in (0..n).step_by(step) {
                        let part = rows.read(start..(start + step).min(n))?;
                        preprocess.check(&part, file)?;
                        check_finite(&part, name, file, start, per_sample)?;
                    }
                    let shape = rows.shape().to_vec();
                    (Source::Rows(rows), SampleAxis::Axis(0), shape)
                }
                None => {
                    let raw = if file.is_dir() {
                        let resize = preprocess.resize.unwrap_or((preprocess.image_size * 256).div_ceil(224));
                        crate::images::load_folder(file, resize, preprocess.image_size, preprocess.layout)?
                    } else {
                        read_tensor(file)?
                    };
                    preprocess.check(&raw, file)?;
                    let axis = axes.axis(name, raw.shape().len());
                    let raw = if axis == SampleAxis::Axis(0) { raw } else { preprocess.transform(&raw) };
                    let n = match axis {
                        SampleAxis::Axis(a) => raw.shape()[a],
                        SampleAxis::Shared => 1,
                    };
                    check_finite(&raw, name, file, 0, raw.len() / n.max(1))?;
                    let shape = raw.shape().to_vec();
                    (Source::Loaded(raw), axis, shape)
                }
            };
            let n = match axis {
                SampleAxis::Axis(a) => shape[a],
                SampleAxis::Shared => 1,
            };
            match (samples, axis) {
                (_, SampleAxis::Shared) => {}
                (Some(m), SampleAxis::Axis(a)) if m != n => bail!(
                    "{}: {n} samples along axis {a} (where input '{name}' keeps them), but the other inputs have {m}",
                    file.display()
                ),
                _ => samples = Some(n),
            }
            inputs.push((name.clone(), source, axis));
        }
        let samples = samples.unwrap_or(usize::from(!inputs.is_empty()));
        if inputs.is_empty() {
            bail!("no data given");
        }
        if samples == 0 {
            let names: Vec<String> = files.iter().map(|(_, f)| f.display().to_string()).collect();
            bail!("{}: holds zero samples", names.join(", "));
        }
        Ok(Dataset { inputs, preprocess: preprocess.clone(), samples })
    }

    /// The samples `rows` of every input as the model sees them (read from their files when they
    /// stay there, preprocessed when asked).
    pub fn batch(&self, rows: std::ops::Range<usize>) -> Result<Vec<(String, Tensor)>, Failure> {
        self.inputs
            .iter()
            .map(|(n, source, axis)| {
                let part = match (source, axis) {
                    (Source::Rows(r), _) => r.read(rows.clone()).map_err(Failure::User)?,
                    (Source::Loaded(t), SampleAxis::Axis(a)) => {
                        t.slice_axis(*a, rows.start, rows.len()).unwrap_or_else(|| t.clone())
                    }
                    (Source::Loaded(t), SampleAxis::Shared) => t.clone(),
                };
                // Data kept raw is along axis 0; other data was preprocessed at load.
                let raw = *axis == SampleAxis::Axis(0);
                Ok((n.clone(), if raw { self.preprocess.transform(&part) } else { part }))
            })
            .collect()
    }

    /// The first input whose samples are not along axis 0 (shared, or on another axis).
    pub fn input_without_leading_samples(&self) -> Option<&str> {
        self.inputs.iter().find(|(_, _, axis)| *axis != SampleAxis::Axis(0)).map(|(n, ..)| n.as_str())
    }

    pub fn batches(&self, size: usize) -> impl Iterator<Item = Result<Vec<(String, Tensor)>, Failure>> + '_ {
        (0..self.samples).step_by(size.max(1)).map(move |s| self.batch(s..(s + size).min(self.samples)))
    }
}

/// The default FP32 memory of the commands whose enable-one walks the FP32 pass when the values
/// do not all fit (analyze, litemp, automp), in MiB.
pub(crate) const WALKED_FP32_MIB: usize = qanalyze::ENABLE_ONE_BUDGET >> 20;

/// The default FP32 memory of the commands that run their simulations in full when the values do
/// not all fit (amp, autoquant), in MiB.
pub(crate) const RESUMED_FP32_MIB: usize = 4096;

/// The data of a job: calibration samples, and evaluation samples with labels when present.
pub(crate) struct JobData {
    pub calib: Dataset,
    pub eval: Option<Dataset>,
    pub labels: Option<Vec<i64>>,
}

impl JobData {
    /// Loads the named files; with none named, `<model>_calib.npy`, `<model>_eval.npy` and
    /// `<model>_labels.npy` beside the model serve for its first input.
    pub fn load(job: &JobArgs, model: &qgraph::Model, evaluation: &EvalArgs) -> Result<JobData, Failure> {
        let first_input = model.graph.inputs().first().map(|&v| model.graph.value(v).name.clone());
        let axes = SampleAxes::of(model);
        let (model, calib, pre) = (&job.model, &job.calib, &job.preprocess);
        let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let beside =
            |kind: &str| Some(model.with_file_name(format!("{stem}_{kind}.npy"))).filter(|p| p.is_file());
        let default_feed =
            |kind: &str| first_input.clone().zip(beside(kind)).map(|f| vec![f]).unwrap_or_default();
        let calib_files = if calib.is_empty() { default_feed("calib") } else { calib.to_vec() };
        if calib_files.is_empty() {
            return Err(user(anyhow::anyhow!(
                "no calibration data: give --calib NAME=FILE.npy or put {stem}_calib.npy beside the model"
            )));
        }
        let eval_files =
            if evaluation.eval.is_empty() { default_feed("eval") } else { evaluation.eval.clone() };
        let labels_file = evaluation.labels.clone().or_else(|| beside("labels"));
        let calib = Dataset::load(&calib_files, pre, &axes).map_err(Failure::User)?;
        let eval = if eval_files.is_empty() {
            None
        } else {
            Some(Dataset::load(&eval_files, pre, &axes).map_err(Failure::User)?)
        };
        let labels: Option<Vec<i64>> = match &labels_file {
            Some(path) => Some(read_labels(path)?),
            None => None,
        };
        if let (Some(l), Some(e)) = (&labels, &eval)
            && l.len() != e.samples
        {
            return Err(user(anyhow::anyhow!("{} labels for {} evaluation samples", l.len(), e.samples)));
        }
        Ok(JobData { calib, eval, labels })
    }
}

/// Class labels from `path`: non-negative whole numbers (a NaN, fractional or negative label is a
/// user error naming its row).
pub(crate) fn read_labels(path: &Path) -> Result<Vec<i64>, Failure> {
    let values = crate::read_tensor(path).map_err(Failure::User)?.to_f64_vec();
    values
        .iter()
        .enumerate()
        .map(|(row, &v)| {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53) {
                Ok(v as i64)
            } else {
                Err(user(anyhow::anyhow!(
                    "{}: label {v} of row {row} is not a class index (a whole number ≥ 0)",
                    path.display()
                )))
            }
        })
        .collect()
}

/// One forward pass (FP32 or simulated) on named inputs.
pub(crate) type Forward<'a> = &'a dyn Fn(&[(&str, Tensor)]) -> Result<Vec<Tensor>, Failure>;

/// Top-1 of `run` over `data` against `labels`.
/// Calibrates `sim` on `calib` in batches of `batch`, each read when its turn comes (a read
/// failure stops calibration and is the error).
pub(crate) fn calibrate(
    sim: &mut qcalib::QuantSim,
    calib: &Dataset,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<(), Failure> {
    let mut failed = None;
    let batches = calib.batches(batch.max(1)).map_while(|b| b.map_err(|e| failed = Some(e)).ok());
    let calibrated = sim.calibrate(batches, progress);
    match failed {
        Some(e) => Err(e),
        None => calibrated.map_err(user),
    }
}

pub(crate) fn top1(
    data: &Dataset,
    labels: &[i64],
    batch: usize,
    offset: usize,
    run: Forward<'_>,
) -> Result<f64, Failure> {
    let mut preds = Vec::with_capacity(data.samples);
    for feeds in data.batches(batch) {
        let feeds = feeds?;
        let named: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = run(&named)?;
        let first = out.first().ok_or_else(|| user(anyhow::anyhow!("the model has no output to score")))?;
        if preds.is_empty() {
            check_labels(labels, offset, first.shape().last().copied().unwrap_or(1))?;
        }
        preds.extend(predictions(first, offset));
    }
    Ok(preds.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len().max(1) as f64)
}

/// Labels and `--label-offset` against the `classes` scores of the model's first output.
pub(crate) fn check_labels(labels: &[i64], offset: usize, classes: usize) -> Result<(), Failure> {
    if offset >= classes {
        return Err(user(anyhow::anyhow!("--label-offset {offset} is beyond the model's {classes} scores")));
    }
    let usable = (classes - offset) as i64;
    if let Some((row, &l)) = labels.iter().enumerate().find(|(_, l)| **l >= usable) {
        return Err(user(anyhow::anyhow!(
            "label {l} of row {row} is beyond the model's {classes} scores (label offset {offset})"
        )));
    }
    Ok(())
}

/// A progress bar on stderr counting `unit` (hidden with `quiet`).
/// A progress callback `(done, total)` that moves `pb` (whose length follows `total`).
pub(crate) fn advance(pb: &ProgressBar) -> impl FnMut(usize, usize) + '_ {
    |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    }
}

pub(crate) fn bar(total: usize, what: &str, unit: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {prefix}, {elapsed} elapsed, ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb.set_prefix(unit.to_string());
    pb
}

/// A user error (exit code 1).
pub(crate) fn user<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::User(e.into())
}

/// Argmax of each row of the first output, minus `offset`.
pub(crate) fn predictions(t: &Tensor, offset: usize) -> Vec<i64> {
    let classes = t.shape().last().copied().unwrap_or(1).max(1);
    t.to_f64_vec()
        .chunks(classes)
        .map(|row| {
            row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as i64 - offset as i64
        })
        .collect()
}

/// After calibration: disables the quantizers that make the simulation non-finite where FP32 is
/// finite, checked on the first `batch` samples of `calib`. Returns what it did, one line each
/// (also in `sim.warnings()`).
pub(crate) fn repair_non_finite(
    sim: &mut qcalib::QuantSim,
    calib: &Dataset,
    batch: usize,
) -> Result<Vec<String>, Failure> {
    let Some(first) = calib.batches(batch.max(1)).next().transpose()? else { return Ok(Vec::new()) };
    let named: Vec<(&str, Tensor)> = first.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    sim.disable_non_finite_quantizers(&named).map_err(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph::{DType, Dim, Graph, Model, Shape};

    fn sym(s: &str) -> Dim {
        Dim::Symbol(s.into())
    }

    #[test]
    fn recurrent_state_keeps_samples_on_its_batch_axis_and_scalars_are_shared() {
        let mut g = Graph::new("g");
        g.add_input("audio", DType::F32, Shape(vec![sym("batch"), sym("time")]));
        g.add_input("state", DType::F32, Shape(vec![Dim::Known(2), sym("batch"), Dim::Known(3)]));
        g.add_input("h", DType::F32, Shape(vec![Dim::Known(1), sym(""), Dim::Known(3)]));
        g.add_input("sr", DType::I64, Shape(vec![]));
        let axes = SampleAxes::of(&Model::new(g, 17));
        assert_eq!(axes.axis("audio", 2), SampleAxis::Axis(0));
        assert_eq!(axes.axis("state", 3), SampleAxis::Axis(1));
        assert_eq!(axes.axis("h", 3), SampleAxis::Axis(1));
        assert_eq!(axes.axis("sr", 0), SampleAxis::Shared);
        assert_eq!(axes.axis("unknown", 2), SampleAxis::Axis(0));

        let state = Tensor::from_vec(&[2, 4, 3], (0..24).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let data = Dataset {
            inputs: vec![
                ("state".into(), Source::Loaded(state), SampleAxis::Axis(1)),
                ("sr".into(), Source::Loaded(Tensor::scalar(16000i64)), SampleAxis::Shared),
            ],
            preprocess: Preprocess::default(),
            samples: 4,
        };
        let Ok(batch) = data.batch(1..3) else { panic!("rows 1..3 of 4") };
        assert_eq!(batch[0].1.shape(), &[2, 2, 3]);
        assert_eq!(
            batch[0].1.as_f32().unwrap().iter().take(3).copied().collect::<Vec<_>>(),
            vec![3.0, 4.0, 5.0]
        );
        assert_eq!(batch[1].1.len(), 1);
    }
}
