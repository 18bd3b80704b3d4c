//! ONNX → IR: decodes a `ModelProto` (from a path or bytes), reads initializers, `Constant` nodes
//! and external data files, resolves names into the arena, keeps subgraph attributes verbatim with
//! their outer-scope reads, fills missing node names deterministically and sorts the nodes.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, TensorProto, TypeProto, ValueInfoProto,
};

use crate::attr::Attribute;
use crate::dtype::{DType, onnx_code_name};
use crate::error::{GraphError, Result};
use crate::graph::{Graph, Model, Node, Opset, ValueSource};
use crate::ids::{NodeId, Outlet};
use crate::lazy::LazyTensor;
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// External data of at least this many bytes in total is memory-mapped by default.
pub const MAP_EXTERNAL_FROM: u64 = 1 << 30;

/// Initializers smaller than this stay in memory even when external data is mapped (shape
/// constants, norms and biases are read often and cost little).
pub const LAZY_TENSOR_MIN_BYTES: u64 = 64 << 10;

/// How a model's external data is read.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// When a model's initializers keep at least this many bytes in external data files, those
    /// files are memory-mapped and each initializer of at least `map_tensors_from` bytes in them
    /// becomes a [`LazyTensor`], read whenever it is used instead of held in memory. Below it
    /// everything is read in. Default [`MAP_EXTERNAL_FROM`].
    pub map_external_from: u64,
    /// The smallest mapped initializer, in bytes; default [`LAZY_TENSOR_MIN_BYTES`].
    pub map_tensors_from: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { map_external_from: MAP_EXTERNAL_FROM, map_tensors_from: LAZY_TENSOR_MIN_BYTES }
    }
}

/// Loads a model from a file; external data files are resolved next to it.
pub fn load_path(path: impl AsRef<Path>) -> Result<Model> {
    load_path_with(path, LoadOptions::default())
}

/// [`load_path`] with explicit options.
pub fn load_path_with(path: impl AsRef<Path>, options: LoadOptions) -> Result<Model> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| GraphError::Io { path: path.into(), source })?;
    decode_model(&bytes)
        .and_then(|proto| model_from_proto_with(proto, path.parent(), options))
        .map_err(|e| GraphError::InFile { path: path.into(), source: Box::new(e) })
}

/// Loads a model from bytes. `base_dir` is where external data files live; `None` makes tensors
/// stored externally an error.
pub fn load_bytes(bytes: &[u8], base_dir: Option<&Path>) -> Result<Model> {
    let proto = decode_model(bytes)?;
    model_from_proto(proto, base_dir)
}

/// Decodes one serialized `TensorProto` (the `.pb` files of ONNX test data sets). The tensor must
/// hold its data inline.
pub fn tensor_from_bytes(bytes: &[u8]) -> Result<Tensor> {
    let proto = TensorProto::parse_from_bytes(bytes).map_err(|e| GraphError::TensorData {
        tensor: String::new(),
        detail: format!("not a TensorProto: {e}"),
    })?;
    decode_tensor(&proto, None)
}

fn decode_model(bytes: &[u8]) -> Result<ModelProto> {
    if bytes.is_empty() {
        return Err(GraphError::NotOnnx { detail: "the file is empty".into() });
    }
    let proto = ModelProto::parse_from_bytes(bytes).map_err(|e| {
        let detail = e.to_string();
        let lower = detail.to_lowercase();
        if lower.contains("eof") || lower.contains("truncated") {
            GraphError::Truncated { detail }
        } else {
            GraphError::NotOnnx { detail }
        }
    })?;
    if proto.graph.is_none() {
        return Err(GraphError::NotOnnx { detail: "the message has no graph".into() });
    }
    if proto.ir_version <= 0 {
        return Err(GraphError::NotOnnx { detail: format!("invalid ir_version {}", proto.ir_version) });
    }
    Ok(proto)
}

/// Builds the IR from a decoded `ModelProto`.
pub fn model_from_proto(proto: ModelProto, base_dir: Option<&Path>) -> Result<Model> {
    model_from_proto_with(proto, base_dir, LoadOptions::default())
}

fn model_from_proto_with(
    mut proto: ModelProto,
    base_dir: Option<&Path>,
    options: LoadOptions,
) -> Result<Model> {
    let graph_proto = proto.graph.take().ok_or_else(|| GraphError::NotOnnx { detail: "no graph".into() })?;
    let graph = graph_from_proto(&graph_proto, base_dir, options)?;
    Ok(Model {
        ir_version: proto.ir_version,
        opsets: proto
            .opset_import
            .iter()
            .map(|o| Opset { domain: o.domain.clone(), version: o.version })
            .collect(),
        producer_name: proto.producer_name,
        producer_version: proto.producer_version,
        domain: proto.domain,
        model_version: proto.model_version,
        doc_string: proto.doc_string,
        metadata: proto.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect(),
        functions: proto.functions,
        graph,
    })
}

fn graph_from_proto(g: &GraphProto, base_dir: Option<&Path>, options: LoadOptions) -> Result<Graph> {
    let mut graph = Graph::new(g.name.clone());
    graph.doc_string = g.doc_string.clone();
    if let Some(s) = g.sparse_initializer.first() {
        let name = s.values.as_ref().map_or("?", |v| v.name.as_str());
        return Err(GraphError::Unsupported { detail: format!("sparse initializer '{name}'") });
    }

    let decoded = decode_initializers(&g.initializer, base_dir, options)?;
    for (t, data) in g.initializer.iter().zip(decoded) {
        if graph.value_id(&t.name).is_some() {
            return Err(GraphError::DuplicateValue { name: t.name.clone(), by: "an initializer".into() });
        }
        match data {
            Initializer::Read(data) => graph.add_initializer(&t.name, data),
            Initializer::Lazy(data) => graph.add_lazy_initializer(&t.name, data),
        };
    }
    for vi in &g.input {
        // Initializers listed as inputs (IR < 4 style) stay initializers.
        if graph.value_id(&vi.name).is_some() {
            continue;
        }
        let (dtype, shape) = value_type(vi, true)?;
        let id = graph.push_value(vi.name.clone(), ValueSource::Input);
        let v = graph.value_mut(id);
        v.dtype = dtype;
        v.shape = shape;
        graph.inputs.push(id);
    }

    // Nodes: names first (deterministic fill as AIMET does: `/<OpType>`, `/<OpType>_<k>`), then
    // outputs, so inputs may refer to nodes later in the file.
    let mut taken: HashSet<String> = HashSet::new();
    let mut per_type: HashMap<&str, usize> = HashMap::new();
    for (i, np) in g.node.iter().enumerate() {
        let mut name = np.name.clone();
        if name.is_empty() || taken.contains(&name) {
            let base = if name.is_empty() { format!("/{}", np.op_type) } else { name.clone() };
            let k = per_type.entry(np.op_type.as_str()).or_insert(0);
            name = base.clone();
            while taken.contains(&name) {
                *k += 1;
                name = format!("{base}_{k}");
            }
        }
        taken.insert(name.clone());
        let node_id = NodeId(i as u32);
        let mut attrs = Vec::with_capacity(np.attribute.len());
        for a in &np.attribute {
            attrs.push((a.name.clone(), attribute_from_proto(a, &name, &np.op_type, base_dir)?));
        }
        let mut outputs = Vec::with_capacity(np.output.len());
        for (slot, out) in np.output.iter().enumerate() {
            if out.is_empty() {
                outputs.push(None);
                continue;
            }
            if graph.value_id(out).is_some() {
                return Err(GraphError::DuplicateValue { name: out.clone(), by: format!("node '{name}'") });
            }
            outputs
                .push(Some(graph.push_value(out.clone(), ValueSource::Node(Outlet { node: node_id, slot }))));
        }
        graph.nodes.push(Node {
            name,
            op_type: np.op_type.clone(),
            domain: np.domain.clone(),
            attrs,
            doc_string: np.doc_string.clone(),
            inputs: Vec::new(),
            outputs,
            implicit_inputs: Vec::new(),
        });
        if np.op_type == "Constant" && np.domain.is_empty() {
            let node = &graph.nodes[i];
            let data = constant_value(node)?;
            if let Some(v) = node.output(0) {
                let val = graph.value_mut(v);
                val.dtype = Some(data.dtype());
                val.shape = Some(Shape::known(data.shape()));
                val.data = Some(data);
            }
        }
    }

    for (i, np) in g.node.iter().enumerate() {
        let node_id = NodeId(i as u32);
        let mut inputs = Vec::with_capacity(np.input.len());
        for (slot, name) in np.input.iter().enumerate() {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            let v = graph.value_id(name).ok_or_else(|| GraphError::DanglingInput {
                node: graph.nodes[i].name.clone(),
                op: np.op_type.clone(),
                input: name.clone(),
            })?;
            graph.values[v.index()].consumers.push(Outlet { node: node_id, slot });
            inputs.push(Some(v));
        }
        let mut outer: Vec<String> = Vec::new();
        for a in &np.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                for name in free_names(sub) {
                    if !outer.contains(&name) {
                        outer.push(name);
                    }
                }
            }
        }
        let mut implicit = Vec::with_capacity(outer.len());
        for name in outer {
            let v = graph.value_id(&name).ok_or_else(|| GraphError::DanglingInput {
                node: graph.nodes[i].name.clone(),
                op: np.op_type.clone(),
                input: name.clone(),
            })?;
            graph.values[v.index()].implicit_consumers.push(node_id);
            implicit.push(v);
        }
        let node = &mut graph.nodes[i];
        node.inputs = inputs;
        node.implicit_inputs = implicit;
    }

    for vi in &g.output {
        let v =
            graph.value_id(&vi.name).ok_or_else(|| GraphError::DanglingOutput { output: vi.name.clone() })?;
        let (dtype, shape) = value_type(vi, true)?;
        let val = graph.value_mut(v);
        val.dtype = val.dtype.or(dtype);
        if val.shape.is_none() {
            val.shape = shape;
        }
        graph.outputs.push(v);
    }
    for vi in &g.value_info {
        let Some(v) = graph.value_id(&vi.name) else { continue };
        let (dtype, shape) = value_type(vi, false)?;
        let val = graph.value_mut(v);
        if val.data.is_none() && val.lazy.is_none() {
            val.dtype = dtype.or(val.dtype);
            val.shape = shape.or(val.shape.take());
        }
    }
    graph.sort_topologically()?;
    Ok(graph)
}

/// An initializer as loaded: read into memory, or mapped and read on demand.
enum Initializer {
    Read(Tensor),
    Lazy(LazyTensor),
}

/// Decodes all initializers. Little-endian raw payloads, the bulk of a large model, are decoded on
/// the rayon pool (protobuf messages are not `Sync`, so the jobs carry plain slices). External
/// data past `options.map_external_from` is mapped instead (see [`LoadOptions`]).
fn decode_initializers(
    tensors: &[TensorProto],
    base_dir: Option<&Path>,
    options: LoadOptions,
) -> Result<Vec<Initializer>> {
    struct RawJob<'a> {
        index: usize,
        dtype: DType,
        shape: Vec<usize>,
        bytes: &'a [u8],
    }
    let is_external = |t: &TensorProto| t.data_location.value() == DataLocation::EXTERNAL as i32;
    let mut external = Vec::new();
    let mut external_total = 0u64;
    for t in tensors.iter().filter(|t| is_external(t)) {
        let range = external_range(t, base_dir)?;
        external_total = external_total.saturating_add(range.length);
        external.push(range);
    }
    let map = external_total >= options.map_external_from;
    let mut maps: HashMap<PathBuf, Arc<memmap2::Mmap>> = HashMap::new();
    let mut external = external.into_iter();
    let mut out: Vec<Option<Initializer>> = tensors.iter().map(|_| None).collect();
    let mut jobs = Vec::new();
    for (index, t) in tensors.iter().enumerate() {
        if is_external(t) {
            let range = external.next().expect("one range per external tensor");
            out[index] = Some(if map && range.length >= options.map_tensors_from {
                Initializer::Lazy(map_external(t, &range, &mut maps)?)
            } else {
                Initializer::Read(decode_tensor(t, base_dir)?)
            });
            continue;
        }
        let raw = !t.raw_data.is_empty() && t.segment.is_none();
        match (raw, DType::from_onnx(t.data_type)) {
            (true, Some(dtype)) => {
                let shape = tensor_shape(t)?;
                jobs.push(RawJob { index, dtype, shape, bytes: &t.raw_data });
            }
            _ => out[index] = Some(Initializer::Read(decode_tensor(t, base_dir)?)),
        }
    }
    let decoded: Vec<(usize, Option<Tensor>)> =
        jobs.par_iter().map(|j| (j.index, Tensor::from_le_bytes(j.dtype, &j.shape, j.bytes))).collect();
    for (index, t) in decoded {
        // A size mismatch is reported by the sequential decoder, which names the tensor.
        out[index] = Some(Initializer::Read(match t {
            Some(t) => t,
            None => decode_tensor(&tensors[index], base_dir)?,
        }));
    }
    Ok(out.into_iter().map(|t| t.expect("every initializer decoded")).collect())
}

/// Maps the file of an external tensor (once per file) and makes the tensor a view of its range.
fn map_external(
    t: &TensorProto,
    range: &ExternalRange,
    maps: &mut HashMap<PathBuf, Arc<memmap2::Mmap>>,
) -> Result<LazyTensor> {
    let fail = |detail: String| GraphError::ExternalData {
        tensor: t.name.clone(),
        path: range.location.clone(),
        detail,
    };
    let dtype = DType::from_onnx(t.data_type).ok_or_else(|| GraphError::UnsupportedDtype {
        tensor: t.name.clone(),
        dtype: onnx_code_name(t.data_type),
    })?;
    let map = match maps.get(&range.path) {
        Some(m) => m.clone(),
        None => {
            let file = std::fs::File::open(&range.path).map_err(|e| fail(e.to_string()))?;
            let m = Arc::new(crate::lazy::map_file(&file).map_err(|e| fail(format!("cannot map: {e}")))?);
            maps.insert(range.path.clone(), m.clone());
            m
        }
    };
    let too_big = || fail("the range does not fit in this machine's address space".into());
    let offset = usize::try_from(range.offset).map_err(|_| too_big())?;
    let length = usize::try_from(range.length).map_err(|_| too_big())?;
    LazyTensor::mapped(&t.name, dtype, &tensor_shape(t)?, map, offset, length)
}

/// The dims of a tensor proto as sizes.
fn tensor_shape(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| GraphError::TensorData {
                tensor: t.name.clone(),
                detail: format!("negative dimension {d}"),
            })
        })
        .collect()
}

/// The outer-scope names the subgraphs of `node` read, in the order of
/// [`Node::implicit_inputs`](crate::Node::implicit_inputs).
pub fn subgraph_outer_names(node: &crate::Node) -> Vec<String> {
    let mut outer: Vec<String> = Vec::new();
    for (_, a) in &node.attrs {
        let subs: Vec<&GraphProto> = match a {
            crate::Attribute::Graph(g) => vec![g.as_ref()],
            crate::Attribute::Graphs(gs) => gs.iter().collect(),
            _ => continue,
        };
        for sub in subs {
            for name in free_names(sub) {
                if !outer.contains(&name) {
                    outer.push(name);
                }
            }
        }
    }
    outer
}

/// A subgraph (an `If` branch, a `Loop` body) as a model of its own at default-domain `opset`:
/// the outer-scope names it reads become graph inputs after its own. Returns the model and
/// those names, in input order.
pub fn subgraph_model(g: &GraphProto, opset: i64) -> Result<(Model, Vec<String>)> {
    let outer = free_names(g);
    let mut proto = g.clone();
    for name in &outer {
        proto.input.push(ValueInfoProto { name: name.clone(), ..Default::default() });
    }
    let graph = graph_from_proto(&proto, None, LoadOptions::default())?;
    Ok((Model::new(graph, opset), outer))
}

/// Names a subgraph reads but does not define: its outer-scope dependencies (nested subgraphs
/// included), in order of first read.
pub fn subgraph_free_names(g: &GraphProto) -> Vec<String> {
    free_names(g)
}

fn free_names(g: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|v| v.name.as_str()));
    defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
    for n in &g.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    let mut free: Vec<String> = Vec::new();
    let note = |name: &str, free: &mut Vec<String>| {
        if !name.is_empty() && !defined.contains(name) && !free.iter().any(|f| f == name) {
            free.push(name.to_string());
        }
    };
    for n in &g.node {
        for i in &n.input {
            note(i, &mut free);
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                for name in free_names(sub) {
                    note(&name, &mut free);
                }
            }
        }
    }
    for o in &g.output {
        note(&o.name, &mut free);
    }
    free
}

fn value_type(vi: &ValueInfoProto, required_tensor: bool) -> Result<(Option<DType>, Option<Shape>)> {
    let Some(tp) = vi.type_.as_ref() else { return Ok((None, None)) };
    if !tp.has_tensor_type() {
        if required_tensor && tp.value.is_some() {
            return Err(GraphError::Unsupported {
                detail: format!(
                    "graph input/output '{}' is not a tensor (sequence, map or optional)",
                    vi.name
                ),
            });
        }
        return Ok((None, None));
    }
    tensor_type(&vi.name, tp)
}

fn tensor_type(name: &str, tp: &TypeProto) -> Result<(Option<DType>, Option<Shape>)> {
    let tt = tp.tensor_type();
    let dtype = match tt.elem_type {
        0 => None,
        code => Some(DType::from_onnx(code).ok_or_else(|| GraphError::UnsupportedDtype {
            tensor: name.into(),
            dtype: onnx_code_name(code),
        })?),
    };
    let shape = tt.shape.as_ref().map(|s| {
        Shape(
            s.dim
                .iter()
                .map(|d| {
                    if d.has_dim_value() && d.dim_value() >= 0 {
                        Dim::Known(d.dim_value() as usize)
                    } else {
                        Dim::Symbol(d.dim_param().to_string())
                    }
                })
                .collect(),
        )
    });
    Ok((dtype, shape))
}

/// Decodes a `TensorProto` (raw data, typed fields, or external file).
pub(crate) fn decode_tensor(t: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let bad = |detail: String| GraphError::TensorData { tensor: t.name.clone(), detail };
    let dtype = DType::from_onnx(t.data_type).ok_or_else(|| GraphError::UnsupportedDtype {
        tensor: t.name.clone(),
        dtype: onnx_code_name(t.data_type),
    })?;
    if t.segment.is_some() {
        return Err(GraphError::Unsupported { detail: format!("segmented tensor '{}'", t.name) });
    }
    let shape = tensor_shape(t)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("element count overflows".into()))?;
    let mismatch =
        |found: usize| bad(format!("shape {shape:?} needs {count} {dtype} elements, the file holds {found}"));

    if t.data_location.value() == DataLocation::EXTERNAL as i32 {
        let bytes = read_external(t, base_dir)?;
        return Tensor::from_le_bytes(dtype, &shape, &bytes)
            .ok_or_else(|| mismatch(raw_count(dtype, bytes.len())));
    }
    if !t.raw_data.is_empty() {
        return Tensor::from_le_bytes(dtype, &shape, &t.raw_data)
            .ok_or_else(|| mismatch(raw_count(dtype, t.raw_data.len())));
    }
    let typed = match dtype {
        DType::F32 => Tensor::from_vec(&shape, t.float_data.clone()).ok_or(t.float_data.len()),
        DType::F64 => Tensor::from_vec(&shape, t.double_data.clone()).ok_or(t.double_data.len()),
        DType::I64 => Tensor::from_vec(&shape, t.int64_data.clone()).ok_or(t.int64_data.len()),
        DType::U32 | DType::U64 => {
            let v: Vec<i64> = t.uint64_data.iter().map(|&x| x as i64).collect();
            if v.len() == count { Ok(Tensor::from_i64s(dtype, &shape, &v).unwrap()) } else { Err(v.len()) }
        }
        DType::F16 | DType::BF16 => {
            let bits: Vec<u8> = t.int32_data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect();
            Tensor::from_le_bytes(dtype, &shape, &bits).ok_or(t.int32_data.len())
        }
        // One packed byte (two elements) per int32.
        DType::I4 | DType::U4 => {
            let bytes: Vec<u8> = t.int32_data.iter().map(|&x| x as u8).collect();
            Tensor::from_le_bytes(dtype, &shape, &bytes).ok_or(2 * t.int32_data.len())
        }
        _ => {
            let v: Vec<i64> = t.int32_data.iter().map(|&x| i64::from(x)).collect();
            if v.len() == count { Ok(Tensor::from_i64s(dtype, &shape, &v).unwrap()) } else { Err(v.len()) }
        }
    };
    typed.map_err(mismatch)
}

/// Elements that `bytes` bytes of ONNX raw storage hold.
fn raw_count(dtype: DType, bytes: usize) -> usize {
    match dtype {
        DType::I4 | DType::U4 => bytes.saturating_mul(2),
        other => bytes / other.size_of(),
    }
}

/// Where an external tensor's bytes are: its file and the checked byte range in it.
struct ExternalRange {
    /// The `location` as the model names it.
    location: String,
    path: PathBuf,
    offset: u64,
    length: u64,
}

/// Resolves an external tensor's `location`, `offset` and `length` against the model's folder
/// and checks the range against the file's size.
fn external_range(t: &TensorProto, base_dir: Option<&Path>) -> Result<ExternalRange> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let err = |what: &str| GraphError::ExternalData {
            tensor: t.name.clone(),
            path: location.clone().unwrap_or_default(),
            detail: format!("invalid {what} '{}'", kv.value),
        };
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = kv.value.parse().map_err(|_| err("offset"))?,
            "length" => length = Some(kv.value.parse::<u64>().map_err(|_| err("length"))?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| GraphError::ExternalData {
        tensor: t.name.clone(),
        path: String::new(),
        detail: "no 'location' key".into(),
    })?;
    let fail =
        |detail: String| GraphError::ExternalData { tensor: t.name.clone(), path: location.clone(), detail };
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(fail("the location must be a relative path inside the model's folder".into()));
    }
    let base =
        base_dir.ok_or_else(|| fail("the model was loaded from bytes without a base directory".into()))?;
    let path = base.join(rel);
    let size = std::fs::metadata(&path).map_err(|e| fail(e.to_string()))?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(fail(format!("offset {offset} + length {length} exceeds the file size {size}")));
    }
    Ok(ExternalRange { location, path, offset, length })
}

fn read_external(t: &TensorProto, base_dir: Option<&Path>) -> Result<Vec<u8>> {
    let range = external_range(t, base_dir)?;
    let fail = |detail: String| GraphError::ExternalData {
        tensor: t.name.clone(),
        path: range.location.clone(),
        detail,
    };
    let mut file = std::fs::File::open(&range.path).map_err(|e| fail(e.to_string()))?;
    file.seek(SeekFrom::Start(range.offset)).map_err(|e| fail(e.to_string()))?;
    let length = usize::try_from(range.length)
        .map_err(|_| fail("the range does not fit in this machine's address space".into()))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(length).map_err(|_| fail(format!("cannot allocate {length} bytes")))?;
    bytes.resize(length, 0);
    file.read_exact(&mut bytes).map_err(|e| fail(e.to_string()))?;
    Ok(bytes)
}

fn attribute_from_proto(
    a: &AttributeProto,
    node: &str,
    op: &str,
    base_dir: Option<&Path>,
) -> Result<Attribute> {
    let kind = match a.type_.enum_value() {
        Ok(AttributeType::UNDEFINED) | Err(_) => guess_attribute_type(a),
        Ok(k) => k,
    };
    let missing = || GraphError::Attribute {
        node: node.into(),
        op: op.into(),
        attr: a.name.clone(),
        detail: "declared type has no value".into(),
    };
    Ok(match kind {
        AttributeType::FLOAT => Attribute::Float(a.f),
        AttributeType::INT => Attribute::Int(a.i),
        AttributeType::STRING => Attribute::String(a.s.clone()),
        AttributeType::FLOATS => Attribute::Floats(a.floats.clone()),
        AttributeType::INTS => Attribute::Ints(a.ints.clone()),
        AttributeType::STRINGS => Attribute::Strings(a.strings.clone()),
        AttributeType::TENSOR => {
            Attribute::Tensor(decode_tensor(a.t.as_ref().ok_or_else(missing)?, base_dir)?)
        }
        AttributeType::TENSORS => {
            Attribute::Tensors(a.tensors.iter().map(|t| decode_tensor(t, base_dir)).collect::<Result<_>>()?)
        }
        AttributeType::GRAPH => Attribute::Graph(Box::new(a.g.as_ref().ok_or_else(missing)?.clone())),
        AttributeType::GRAPHS => Attribute::Graphs(a.graphs.clone()),
        _ => Attribute::Verbatim(Box::new(a.clone())),
    })
}

/// Very old files leave `type` unset; infer it from the populated field.
fn guess_attribute_type(a: &AttributeProto) -> AttributeType {
    if !a.ints.is_empty() {
        AttributeType::INTS
    } else if !a.floats.is_empty() {
        AttributeType::FLOATS
    } else if !a.strings.is_empty() {
        AttributeType::STRINGS
    } else if a.t.is_some() {
        AttributeType::TENSOR
    } else if a.g.is_some() {
        AttributeType::GRAPH
    } else if !a.s.is_empty() {
        AttributeType::STRING
    } else if a.f != 0.0 {
        AttributeType::FLOAT
    } else {
        AttributeType::INT
    }
}

/// The value of a `Constant` node from whichever attribute holds it.
fn constant_value(node: &Node) -> Result<Tensor> {
    let (name, attr) = node
        .attrs
        .first()
        .ok_or_else(|| node.invalid_attr("value", "Constant node without a value attribute"))?;
    Ok(match (name.as_str(), attr) {
        ("value", Attribute::Tensor(t)) => t.clone(),
        ("value_float", Attribute::Float(f)) => Tensor::scalar(*f),
        ("value_floats", Attribute::Floats(f)) => Tensor::from_vec(&[f.len()], f.clone()).unwrap(),
        ("value_int", Attribute::Int(i)) => Tensor::scalar(*i),
        ("value_ints", Attribute::Ints(i)) => Tensor::from_vec(&[i.len()], i.clone()).unwrap(),
        (other, a) => {
            return Err(
                node.invalid_attr(other, format!("unsupported Constant attribute of type {}", a.kind()))
            );
        }
    })
}
