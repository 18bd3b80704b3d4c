//! The AIMET quantsim config (spec §3.1): a JSON file that says which tensors are quantized, with
//! which symmetry and granularity, which op chains are fused (supergroups) and which outputs have
//! fixed ranges. Parsed by hand from `serde_json::Value` so every error names the key path and the
//! offending value; booleans may be JSON booleans or AIMET's strings `"True"`/`"False"`.
//! Built-in presets reproduce AIMET's aliases `default` (per-channel), `default_per_tensor` and
//! `htp_v73` from the contents the spec summarises (§3.9).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CalibError, Result};

/// On/off and symmetry for one kind of parameter (`weight`, `bias`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamRule {
    /// Whether the parameter is quantized (`None`: not said at this level).
    pub is_quantized: Option<bool>,
    /// Whether its grid is symmetric (`None`: not said at this level).
    pub is_symmetric: Option<bool>,
}

/// A fixed range for an op's output quantizer (`encoding_constraints`, spec §3.6): a missing bound
/// means "take the calibrated value".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeConstraint {
    /// Lower bound.
    pub min: f64,
    /// Upper bound, if fixed.
    pub max: Option<f64>,
}

/// One `supported_kernels` entry (consumed by mixed precision, not by placement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// Activation precision.
    pub activation: KernelPrecision,
    /// Parameter precision (`None` at op level when only activations are given).
    pub param: Option<KernelPrecision>,
}

/// Bitwidth and kind of one side of a supported kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPrecision {
    /// 4, 8, 16 or 32.
    pub bitwidth: u32,
    /// Float (16 or 32 bits) rather than integer.
    pub float: bool,
}

/// The `defaults` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Defaults {
    /// `ops.is_output_quantized`.
    pub output_quantized: bool,
    /// `ops.is_symmetric` for activations.
    pub activation_symmetric: Option<bool>,
    /// `params.is_quantized`.
    pub params_quantized: bool,
    /// `params.is_symmetric`.
    pub params_symmetric: Option<bool>,
    /// `strict_symmetric`, applied to every quantizer when present.
    pub strict_symmetric: Option<bool>,
    /// `unsigned_symmetric`, applied to every quantizer when present.
    pub unsigned_symmetric: Option<bool>,
    /// `per_channel_quantization`.
    pub per_channel: bool,
    /// `supported_kernels`.
    pub supported_kernels: Vec<Kernel>,
    /// `hw_version`, e.g. `V73`.
    pub hw_version: Option<String>,
}

/// One entry of the `op_type` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpRule {
    /// `is_input_quantized` (only `True` is allowed).
    pub input_quantized: Option<bool>,
    /// `is_output_quantized`.
    pub output_quantized: Option<bool>,
    /// `is_symmetric` for the op's activation quantizers.
    pub symmetric: Option<bool>,
    /// Per parameter kind.
    pub params: BTreeMap<String, ParamRule>,
    /// `per_channel_quantization`.
    pub per_channel: Option<bool>,
    /// `encoding_constraints`.
    pub constraint: Option<RangeConstraint>,
    /// `supported_kernels`.
    pub supported_kernels: Vec<Kernel>,
}

/// A parsed quantsim config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantsimConfig {
    /// `defaults`.
    pub defaults: Defaults,
    /// `params`: rules per parameter kind.
    pub params: BTreeMap<String, ParamRule>,
    /// `op_type`: rules per ONNX op type.
    pub op_types: BTreeMap<String, OpRule>,
    /// `supergroups`: op-type chains whose intermediate outputs are not quantized.
    pub supergroups: Vec<Vec<String>>,
    /// `supergroup_pass_list`: named graph passes (`MatmulAdd`, `LayerNormalization`, …).
    pub supergroup_passes: Vec<String>,
    /// `model_input.is_input_quantized`.
    pub model_input_quantized: bool,
    /// `model_output.is_output_quantized`.
    pub model_output_quantized: Option<bool>,
}

/// Graph passes a `supergroup_pass_list` may name.
const KNOWN_PASSES: [&str; 4] = ["MatmulAdd", "LayerNormalization", "RMSNormalization", "MaskedSoftmax"];

/// Built-in presets: (name, aliases, JSON).
const PRESETS: [(&str, &[&str], &str); 3] = [
    ("default", &["default_per_channel"], include_str!("../presets/default_per_channel.json")),
    ("default_per_tensor", &[], include_str!("../presets/default_per_tensor.json")),
    ("htp_v73", &[], include_str!("../presets/htp_v73.json")),
];

/// Op types a config may name: the ONNX operators plus the non-ONNX names AIMET's shipped configs
/// use. Anything else is most likely a typo and is rejected.
const KNOWN_OP_TYPES: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Add",
    "AffineGrid",
    "And",
    "ArgMax",
    "ArgMin",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "AveragePool",
    "BatchNormalization",
    "Bernoulli",
    "BitShift",
    "BitwiseAnd",
    "BitwiseNot",
    "BitwiseOr",
    "BitwiseXor",
    "BlackmanWindow",
    "Cast",
    "CastLike",
    "Ceil",
    "Celu",
    "CenterCropPad",
    "Clip",
    "Col2Im",
    "Compress",
    "Concat",
    "ConcatFromSequence",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "Cos",
    "Cosh",
    "CumSum",
    "DFT",
    "DeformConv",
    "DepthToSpace",
    "DequantizeLinear",
    "Det",
    "Div",
    "Dropout",
    "DynamicQuantizeLinear",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "EyeLike",
    "Flatten",
    "Floor",
    "GRU",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalLpPool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "GridSample",
    "GroupNormalization",
    "HammingWindow",
    "HannWindow",
    "HardSigmoid",
    "HardSwish",
    "Hardmax",
    "Identity",
    "If",
    "ImageDecoder",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LRN",
    "LSTM",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "Loop",
    "LpNormalization",
    "LpPool",
    "MatMul",
    "MatMulInteger",
    "Max",
    "MaxPool",
    "MaxRoiPool",
    "MaxUnpool",
    "Mean",
    "MelWeightMatrix",
    "Min",
    "Mish",
    "Mod",
    "Mul",
    "Multinomial",
    "Neg",
    "NegativeLogLikelihoodLoss",
    "NonMaxSuppression",
    "NonZero",
    "Not",
    "OneHot",
    "Optional",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "QLinearConv",
    "QLinearMatMul",
    "QuantizeLinear",
    "RMSNormalization",
    "RNN",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Range",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "RegexFullMatch",
    "Relu",
    "Reshape",
    "Resize",
    "ReverseSequence",
    "RoiAlign",
    "RotaryEmbedding",
    "Round",
    "STFT",
    "Scan",
    "Scatter",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "SequenceAt",
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceErase",
    "SequenceInsert",
    "SequenceLength",
    "SequenceMap",
    "Shape",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Size",
    "Slice",
    "Softmax",
    "SoftmaxCrossEntropyLoss",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Split",
    "SplitToSequence",
    "Sqrt",
    "Squeeze",
    "StringConcat",
    "StringNormalizer",
    "StringSplit",
    "Sub",
    "Sum",
    "Swish",
    "Tan",
    "Tanh",
    "TfIdfVectorizer",
    "ThresholdedRelu",
    "Tile",
    "TopK",
    "Transpose",
    "Trilu",
    "Unique",
    "Unsqueeze",
    "Upsample",
    "Where",
    "Xor",
    // Names used by AIMET's own configs for ops that are not in the ONNX standard.
    "ChannelShuffle",
    "CropAndResize",
    "BatchToSpace",
    "SpaceToBatch",
    "MaskedSoftmax",
];

impl QuantsimConfig {
    /// Names of the built-in presets.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _, _)| *n).collect()
    }

    /// Adds a graph pass to the `supergroup_pass_list` (e.g. `MaskedSoftmax`, which no shipped
    /// config names, on top of a preset); a pass already listed is not added twice.
    pub fn add_pass(&mut self, name: &str) -> Result<()> {
        if !KNOWN_PASSES.contains(&name) {
            return Err(config_error(
                "supergroup_pass_list",
                format!("unknown pass '{name}' (known: {})", KNOWN_PASSES.join(", ")),
            ));
        }
        if !self.supergroup_passes.iter().any(|p| p == name) {
            self.supergroup_passes.push(name.to_string());
        }
        Ok(())
    }

    /// A built-in preset by name (or alias), else a JSON file at that path.
    pub fn load(name_or_path: &str) -> Result<QuantsimConfig> {
        if let Some((_, _, text)) =
            PRESETS.iter().find(|(n, aliases, _)| *n == name_or_path || aliases.contains(&name_or_path))
        {
            return QuantsimConfig::from_json_str(text);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(CalibError::UnknownPreset {
                name: name_or_path.to_string(),
                known: QuantsimConfig::preset_names().join(", "),
            });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| CalibError::Io { path: path.to_path_buf(), source })?;
        QuantsimConfig::from_json_str(&text)
    }

    /// The `default` preset (AIMET's default: per-channel weights).
    pub fn default_per_channel() -> QuantsimConfig {
        QuantsimConfig::from_json_str(PRESETS[0].2).expect("the built-in preset is valid")
    }

    /// Parses a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<QuantsimConfig> {
        let root: Value = serde_json::from_str(text).map_err(|e| CalibError::Config {
            path: "(file)".into(),
            detail: format!("not valid JSON: {e}"),
        })?;
        QuantsimConfig::from_json(&root)
    }

    /// Parses a config from a JSON value.
    pub fn from_json(root: &Value) -> Result<QuantsimConfig> {
        let top = object(root, "(top level)")?;
        check_keys(
            top,
            "",
            &[
                "defaults",
                "params",
                "op_type",
                "supergroups",
                "supergroup_pass_list",
                "model_input",
                "model_output",
            ],
        )?;
        for key in ["defaults", "params", "op_type", "supergroups", "model_input", "model_output"] {
            if !top.contains_key(key) {
                return Err(config_error(key, "required key is missing"));
            }
        }
        let defaults = parse_defaults(&top["defaults"])?;
        let params = parse_param_rules(&top["params"], "params")?;
        let mut op_types = BTreeMap::new();
        for (op, rule) in object(&top["op_type"], "op_type")? {
            let path = format!("op_type.{op}");
            if !KNOWN_OP_TYPES.contains(&op.as_str()) {
                return Err(config_error(&path, format!("unknown op type '{op}'")));
            }
            op_types.insert(op.clone(), parse_op_rule(rule, &path)?);
        }
        let mut supergroups = Vec::new();
        for (i, group) in array(&top["supergroups"], "supergroups")?.iter().enumerate() {
            let path = format!("supergroups[{i}]");
            let g = object(group, &path)?;
            check_keys(g, &path, &["op_list"])?;
            let list = g.get("op_list").ok_or_else(|| config_error(&path, "missing op_list"))?;
            let ops = strings(list, &format!("{path}.op_list"))?;
            if ops.len() < 2 {
                return Err(config_error(
                    &format!("{path}.op_list"),
                    "a supergroup needs at least two op types",
                ));
            }
            for op in &ops {
                if !KNOWN_OP_TYPES.contains(&op.as_str()) {
                    return Err(config_error(&format!("{path}.op_list"), format!("unknown op type '{op}'")));
                }
            }
            supergroups.push(ops);
        }
        let supergroup_passes = match top.get("supergroup_pass_list") {
            Some(v) => strings(v, "supergroup_pass_list")?,
            None => Vec::new(),
        };
        for pass in &supergroup_passes {
            if !KNOWN_PASSES.contains(&pass.as_str()) {
                return Err(config_error(
                    "supergroup_pass_list",
                    format!("unknown pass '{pass}' (known: {})", KNOWN_PASSES.join(", ")),
                ));
            }
        }
        let input = object(&top["model_input"], "model_input")?;
        check_keys(input, "model_input", &["is_input_quantized"])?;
        let model_input_quantized =
            optional_true_only(input, "model_input", "is_input_quantized")?.unwrap_or(false);
        let output = object(&top["model_output"], "model_output")?;
        check_keys(output, "model_output", &["is_output_quantized"])?;
        let model_output_quantized = optional_true_only(output, "model_output", "is_output_quantized")?;
        Ok(QuantsimConfig {
            defaults,
            params,
            op_types,
            supergroups,
            supergroup_passes,
            model_input_quantized,
            model_output_quantized,
        })
    }

    /// Whether params of ops of type `op` are quantized per channel.
    pub fn per_channel_for(&self, op: &str) -> bool {
        self.op_types.get(op).and_then(|r| r.per_channel).unwrap_or(self.defaults.per_channel)
    }

    /// Whether any op type (or the defaults) asks for per-channel quantization.
    pub fn any_per_channel(&self) -> bool {
        self.defaults.per_channel || self.op_types.values().any(|r| r.per_channel == Some(true))
    }

    /// Symmetry a weight of an op of type `op` gets (op-level rule, else defaults, else true).
    pub fn weight_symmetric_for(&self, op: &str) -> bool {
        self.op_types
            .get(op)
            .and_then(|r| r.params.get("weight"))
            .and_then(|p| p.is_symmetric)
            .or(self.defaults.params_symmetric)
            .unwrap_or(true)
    }
}

fn config_error(path: &str, detail: impl Into<String>) -> CalibError {
    CalibError::Config {
        path: if path.is_empty() { "(top level)".into() } else { path.into() },
        detail: detail.into(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| config_error(path, format!("expected an object, found {v}")))
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    v.as_array().ok_or_else(|| config_error(path, format!("expected a list, found {v}")))
}

fn strings(v: &Value, path: &str) -> Result<Vec<String>> {
    array(v, path)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| config_error(&format!("{path}[{i}]"), format!("expected a string, found {s}")))
        })
        .collect()
}

fn check_keys(map: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<()> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(config_error(
                &join(path, key),
                format!("unknown key (allowed here: {})", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

/// A boolean written as JSON `true`/`false` or as AIMET's strings `"True"`/`"False"`.
fn boolean(v: &Value, path: &str) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "True" => Ok(true),
        Value::String(s) if s == "False" => Ok(false),
        other => Err(config_error(path, format!("expected \"True\" or \"False\", found {other}"))),
    }
}

fn optional_bool(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<bool>> {
    map.get(key).map(|v| boolean(v, &join(path, key))).transpose()
}

/// A key whose only allowed value is true (`is_input_quantized`, `is_output_quantized` at the
/// model level).
fn optional_true_only(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<bool>> {
    let v = optional_bool(map, path, key)?;
    if v == Some(false) {
        return Err(config_error(&join(path, key), "only \"True\" is allowed here"));
    }
    Ok(v)
}

fn number(v: &Value, path: &str) -> Result<f64> {
    v.as_f64().ok_or_else(|| config_error(path, format!("expected a number, found {v}")))
}

fn parse_param_rule(v: &Value, path: &str) -> Result<ParamRule> {
    let map = object(v, path)?;
    check_keys(map, path, &["is_quantized", "is_symmetric"])?;
    Ok(ParamRule {
        is_quantized: optional_bool(map, path, "is_quantized")?,
        is_symmetric: optional_bool(map, path, "is_symmetric")?,
    })
}

fn parse_param_rules(v: &Value, path: &str) -> Result<BTreeMap<String, ParamRule>> {
    object(v, path)?
        .iter()
        .map(|(name, rule)| Ok((name.clone(), parse_param_rule(rule, &join(path, name))?)))
        .collect()
}

fn parse_precision(v: &Value, path: &str) -> Result<KernelPrecision> {
    let map = object(v, path)?;
    check_keys(map, path, &["bitwidth", "dtype"])?;
    let bw = map.get("bitwidth").ok_or_else(|| config_error(path, "missing bitwidth"))?;
    let bitwidth = bw.as_u64().filter(|b| [4, 8, 16, 32].contains(b)).ok_or_else(|| {
        config_error(&join(path, "bitwidth"), format!("expected 4, 8, 16 or 32, found {bw}"))
    })? as u32;
    let float = match map.get("dtype").and_then(Value::as_str) {
        Some("int") => false,
        Some("float") => true,
        _ => {
            return Err(config_error(
                &join(path, "dtype"),
                format!("expected \"int\" or \"float\", found {}", map.get("dtype").unwrap_or(&Value::Null)),
            ));
        }
    };
    if float && bitwidth < 16 {
        return Err(config_error(
            &join(path, "bitwidth"),
            format!("float kernels are 16 or 32 bits, found {bitwidth}"),
        ));
    }
    Ok(KernelPrecision { bitwidth, float })
}

/// A `supported_kernels` list in AIMET's format (entries without `param` constrain only the
/// activation side); `path` names it in errors.
pub fn parse_supported_kernels(v: &Value, path: &str) -> Result<Vec<Kernel>> {
    parse_kernels(v, path, false)
}

fn parse_kernels(v: &Value, path: &str, param_required: bool) -> Result<Vec<Kernel>> {
    let mut out = Vec::new();
    for (i, k) in array(v, path)?.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let map = object(k, &p)?;
        check_keys(map, &p, &["activation", "param"])?;
        let activation = parse_precision(
            map.get("activation").ok_or_else(|| config_error(&p, "missing activation"))?,
            &join(&p, "activation"),
        )?;
        let param = match map.get("param") {
            Some(v) => Some(parse_precision(v, &join(&p, "param"))?),
            None if param_required => return Err(config_error(&p, "missing param")),
            None => None,
        };
        out.push(Kernel { activation, param });
    }
    Ok(out)
}

fn parse_defaults(v: &Value) -> Result<Defaults> {
    let path = "defaults";
    let map = object(v, path)?;
    check_keys(
        map,
        path,
        &[
            "ops",
            "params",
            "strict_symmetric",
            "unsigned_symmetric",
            "per_channel_quantization",
            "supported_kernels",
            "hw_version",
        ],
    )?;
    let ops = object(map.get("ops").ok_or_else(|| config_error(path, "missing ops"))?, "defaults.ops")?;
    check_keys(ops, "defaults.ops", &["is_output_quantized", "is_symmetric"])?;
    let output_quantized = optional_true_only(ops, "defaults.ops", "is_output_quantized")?.unwrap_or(false);
    let params = parse_param_rule(
        map.get("params").ok_or_else(|| config_error(path, "missing params"))?,
        "defaults.params",
    )?;
    let hw_version = match map.get("hw_version") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(config_error("defaults.hw_version", format!("expected a string, found {other}")));
        }
    };
    Ok(Defaults {
        output_quantized,
        activation_symmetric: optional_bool(ops, "defaults.ops", "is_symmetric")?,
        params_quantized: params.is_quantized.unwrap_or(false),
        params_symmetric: params.is_symmetric,
        strict_symmetric: optional_bool(map, path, "strict_symmetric")?,
        unsigned_symmetric: optional_bool(map, path, "unsigned_symmetric")?,
        per_channel: optional_bool(map, path, "per_channel_quantization")?.unwrap_or(false),
        supported_kernels: match map.get("supported_kernels") {
            Some(v) => parse_kernels(v, "defaults.supported_kernels", true)?,
            None => Vec::new(),
        },
        hw_version,
    })
}

fn parse_op_rule(v: &Value, path: &str) -> Result<OpRule> {
    let map = object(v, path)?;
    check_keys(
        map,
        path,
        &[
            "is_input_quantized",
            "is_output_quantized",
            "is_symmetric",
            "params",
            "supported_kernels",
            "per_channel_quantization",
            "encoding_constraints",
        ],
    )?;
    let constraint = match map.get("encoding_constraints") {
        None => None,
        Some(c) => {
            let cpath = join(path, "encoding_constraints");
            let cmap = object(c, &cpath)?;
            check_keys(cmap, &cpath, &["min", "max"])?;
            let min = number(
                cmap.get("min").ok_or_else(|| config_error(&cpath, "missing min"))?,
                &join(&cpath, "min"),
            )?;
            let max = cmap.get("max").map(|m| number(m, &join(&cpath, "max"))).transpose()?;
            if max.is_some_and(|m| m <= min) {
                return Err(config_error(
                    &cpath,
                    format!("max {} is not above min {min}", max.unwrap_or_default()),
                ));
            }
            Some(RangeConstraint { min, max })
        }
    };
    Ok(OpRule {
        input_quantized: optional_true_only(map, path, "is_input_quantized")?,
        output_quantized: optional_bool(map, path, "is_output_quantized")?,
        symmetric: optional_bool(map, path, "is_symmetric")?,
        params: match map.get("params") {
            Some(p) => parse_param_rules(p, &join(path, "params"))?,
            None => BTreeMap::new(),
        },
        per_channel: optional_bool(map, path, "per_channel_quantization")?,
        constraint,
        supported_kernels: match map.get("supported_kernels") {
            Some(v) => parse_kernels(v, &join(path, "supported_kernels"), false)?,
            None => Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_differ_where_the_spec_says() {
        let pc = QuantsimConfig::load("default").unwrap();
        let pt = QuantsimConfig::load("default_per_tensor").unwrap();
        let htp = QuantsimConfig::load("htp_v73").unwrap();
        assert!(pc.per_channel_for("Conv") && !pt.per_channel_for("Conv"));
        assert!(!pc.per_channel_for("Add"));
        assert_eq!(pc.supergroups.len(), 5);
        assert_eq!(htp.defaults.hw_version.as_deref(), Some("V73"));
        assert_eq!(htp.op_types["Relu"].constraint, Some(RangeConstraint { min: 0.0, max: None }));
        assert_eq!(pc.params["bias"].is_quantized, Some(false));
        assert!(pc.model_input_quantized);
    }

    #[test]
    fn errors_name_the_key_path_and_value() {
        let bad = r#"{"defaults":{"ops":{"is_output_quantized":"Yes"},"params":{}},"params":{},"op_type":{},
            "supergroups":[],"model_input":{},"model_output":{}}"#;
        let e = QuantsimConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(e.contains("defaults.ops.is_output_quantized") && e.contains("Yes"), "{e}");
        let typo = r#"{"defaults":{"ops":{},"params":{}},"params":{},"op_type":{"Cnov":{}},
            "supergroups":[],"model_input":{},"model_output":{}}"#;
        let e = QuantsimConfig::from_json_str(typo).unwrap_err().to_string();
        assert!(e.contains("op_type.Cnov") && e.contains("unknown op type"), "{e}");
        let missing = r#"{"defaults":{"ops":{},"params":{}}}"#;
        assert!(QuantsimConfig::from_json_str(missing).unwrap_err().to_string().contains("params"));
        assert!(QuantsimConfig::from_json_str("{").is_err());
        assert!(matches!(QuantsimConfig::load("no_such_preset"), Err(CalibError::UnknownPreset { .. })));
    }

    #[test]
    fn string_and_json_booleans_are_equal() {
        let a = r#"{"defaults":{"ops":{"is_output_quantized":"True"},"params":{"is_quantized":"True"}},"params":{},
            "op_type":{},"supergroups":[],"model_input":{"is_input_quantized":"True"},"model_output":{}}"#;
        let b = a.replace("\"True\"", "true");
        assert_eq!(QuantsimConfig::from_json_str(a).unwrap(), QuantsimConfig::from_json_str(&b).unwrap());
    }
}
