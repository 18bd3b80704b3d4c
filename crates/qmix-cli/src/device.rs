//! The device-facing options every job command shares: the target whose precision pairs a plan
//! must use (`--target`), the precision converts a device inserts (`--converts`), and the QDQ
//! export (`--qdq`).

use qcalib::{QdqOptions, QuantSim};
use serde_json::json;

use crate::Failure;
use crate::dataset::user;

/// Arguments of the target, converts and QDQ export.
#[derive(clap::Args)]
pub(crate) struct DeviceArgs {
    /// The runtime the plan must run on: a preset (default: every pair legal; htp_v73: Qualcomm
    /// HTP's pairs) or a JSON file of supported_kernels. Ops at an unsupported (weight,
    /// activation) pair are raised to the cheapest supported one and each change is reported
    /// (legality.json); AMP only considers supported candidates.
    #[arg(long)]
    target: Option<String>,
    /// Simulate the precision converts a device inserts where an op reads a tensor at another
    /// integer precision (int16 output read by an int8 layer, and back), as QNN and onnxruntime's
    /// mixed-precision QDQ models run them; AIMET's simulation leaves them out. The QDQ model then
    /// carries the convert pairs.
    #[arg(long)]
    pub(crate) converts: bool,
    /// Also write a QDQ ONNX model of the simulation (each quantized tensor at its own precision,
    /// with a convert pair where an op reads a tensor at another integer precision) and the plan
    /// as onnxruntime's TensorQuantOverrides (tensor_quant_overrides.json, types by name) and as
    /// AMD Quark's layer configuration (quark_config.json, QConfig.from_dict's form).
    #[arg(long)]
    qdq: bool,
    /// In the QDQ model, store weights as integers plus DequantizeLinear.
    #[arg(long, requires = "qdq")]
    prequantize_weights: bool,
    /// In the QDQ model, store Conv/Gemm biases as int32 plus DequantizeLinear.
    #[arg(long, requires = "qdq")]
    int32_bias: bool,
    /// In the QDQ model, write MatMul layers whose weights are 4-bit blocks (--param int4
    /// --block-size 16, 32, 64, …) as onnxruntime's MatMulNBits (com.microsoft)
    #[arg(long, requires = "qdq")]
    matmul_nbits: bool,
}

impl DeviceArgs {
    /// The `--target`, loaded (before any work, so a bad one fails at once).
    pub(crate) fn target(&self) -> Result<Option<qmix::Target>, Failure> {
        self.target.as_deref().map(qmix::Target::load).transpose().map_err(user)
    }

    /// Makes the plan in `sim` legal for `target`, prints the changes and stages
    /// `legality.json` in `set`.
    pub(crate) fn legalize(
        target: Option<&qmix::Target>,
        sim: &mut QuantSim,
        set: &mut qgraph::OutputSet,
    ) -> Result<Vec<qmix::PlanChange>, Failure> {
        let Some(target) = target else { return Ok(Vec::new()) };
        let changes = qmix::legalize(sim, target).map_err(user)?;
        write_legality(target, &changes, set)?;
        say_changes(target, &changes);
        Ok(changes)
    }

    /// With `--qdq`, stages the QDQ model of `sim` as `file` in `set`.
    pub(crate) fn write_qdq(
        &self,
        sim: &QuantSim,
        set: &mut qgraph::OutputSet,
        file: &str,
    ) -> Result<(), Failure> {
        if !self.qdq {
            return Ok(());
        }
        let options = QdqOptions {
            prequantize_weights: self.prequantize_weights,
            int32_bias: self.int32_bias,
            matmul_nbits: self.matmul_nbits,
        };
        qcalib::write_qdq_model(sim, options, &set.staged(file)).map_err(user)?;
        let placement = sim.placement();
        let blockwise = placement.quantizer_ids().into_iter().any(|q| {
            let q = placement.quantizer(q);
            q.enabled && matches!(q.granularity, qcalib::Granularity::PerBlock { .. })
        });
        if blockwise {
            say!(
                "no tensor_quant_overrides.json: onnxruntime's overrides have no form for blockwise weights"
            );
        } else {
            let overrides = qcalib::tensor_quant_overrides(sim).map_err(user)?;
            qgraph::write_atomically(
                &set.staged("tensor_quant_overrides.json"),
                qcalib::to_pretty_json(&overrides).as_bytes(),
            )?;
        }
        let quark = qcalib::quark_config(sim).map_err(user)?;
        qgraph::write_atomically(
            &set.staged("quark_config.json"),
            qcalib::to_pretty_json(&quark).as_bytes(),
        )?;
        match sim.converts().map_err(user)?.len() {
            0 => say!("wrote {}", set.final_path(file).display()),
            n => say!(
                "wrote {} ({n} precision convert{})",
                set.final_path(file).display(),
                if n == 1 { "" } else { "s" }
            ),
        }
        Ok(())
    }
}

/// Stages `legality.json` (the target and every change made for it) in `set`.
pub(crate) fn write_legality(
    target: &qmix::Target,
    changes: &[qmix::PlanChange],
    set: &mut qgraph::OutputSet,
) -> Result<(), Failure> {
    let doc = json!({
        "target": target.name,
        "source": target.source,
        "changes": changes.iter().map(qmix::PlanChange::to_json).collect::<Vec<_>>(),
    });
    qgraph::write_atomically(&set.staged("legality.json"), qcalib::to_pretty_json(&doc).as_bytes())?;
    Ok(())
}

/// Prints what [`DeviceArgs::legalize`] changed.
pub(crate) fn say_changes(target: &qmix::Target, changes: &[qmix::PlanChange]) {
    match changes.len() {
        0 => say!("every op runs at a pair target {} supports", target.name),
        n => {
            say!(
                "target {}: {n} op{} changed to a supported pair:",
                target.name,
                if n == 1 { "" } else { "s" }
            );
            for c in changes {
                say!("  {c}");
            }
        }
    }
}
