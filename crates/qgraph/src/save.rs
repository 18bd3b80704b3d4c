//! IR → ONNX: encodes a `Model` back into a `ModelProto` (initializers as little-endian raw data,
//! known types and shapes as `value_info`) and writes it atomically (temp file + rename), with
//! external data beside it when the model outgrows one protobuf message or reads its weights on
//! demand; files written as a set; and the bounded read of the small text files (plans, tables)
//! jobs take.

use std::io::{BufWriter, Write};
use std::path::Path;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::tensor_shape_proto::Dimension;
use onnx_protobuf::type_proto::Tensor as TensorTypeProto;
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::attr::Attribute;
use crate::error::{GraphError, Result};
use crate::graph::{Graph, Model, ValueSource};
use crate::ids::ValueId;
use crate::shape::Dim;
use crate::tensor::Tensor;

/// Largest message protobuf can encode (2 GiB).
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Initializers of at least this many bytes go to the external data file when one is written.
const EXTERNAL_MIN_BYTES: usize = 1024;

/// Encodes the model as a `ModelProto`. Lazy initializers ([`crate::LazyTensor`]) are left as
/// placeholders without data, marked external with an empty location: [`save_proto`] streams their
/// data into an external file, [`inline_lazy`] reads it into the message.
pub fn model_to_proto(model: &Model) -> ModelProto {
    let mut p = ModelProto::new();
    p.ir_version = model.ir_version;
    p.opset_import = model
        .opsets
        .iter()
        .map(|o| {
            let mut op = OperatorSetIdProto::new();
            op.domain = o.domain.clone();
            op.version = o.version;
            op
        })
        .collect();
    p.producer_name = model.producer_name.clone();
    p.producer_version = model.producer_version.clone();
    p.domain = model.domain.clone();
    p.model_version = model.model_version;
    p.doc_string = model.doc_string.clone();
    p.metadata_props = model.metadata.iter().map(|(k, v)| string_pair(k, v)).collect();
    p.functions = model.functions.clone();
    p.graph = Some(graph_to_proto(&model.graph)).into();
    p
}

/// Whether `t` is a lazy initializer's placeholder left by [`model_to_proto`].
fn is_lazy_placeholder(t: &TensorProto) -> bool {
    t.data_location.value() == DataLocation::EXTERNAL as i32
        && t.external_data.iter().any(|kv| kv.key == "location" && kv.value.is_empty())
}

/// The data of a placeholder's lazy initializer, read from `model` (which the proto was made from).
fn lazy_bytes(t: &TensorProto, model: &Model) -> Result<Vec<u8>> {
    let lazy =
        model.graph.value_id(&t.name).and_then(|v| model.graph.value(v).lazy.as_ref()).ok_or_else(|| {
            GraphError::Encode {
                detail: format!("initializer '{}' has no data in the model it came from", t.name),
            }
        })?;
    Ok(lazy.load()?.to_le_bytes())
}

/// Reads the data of every lazy initializer's placeholder in `proto` (from [`model_to_proto`] of
/// `model`) into the message.
pub fn inline_lazy(proto: &mut ModelProto, model: &Model) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else { return Ok(()) };
    for t in graph.initializer.iter_mut().filter(|t| is_lazy_placeholder(t)) {
        t.raw_data = lazy_bytes(t, model)?;
        t.data_location = DataLocation::DEFAULT.into();
        t.external_data.clear();
    }
    Ok(())
}

/// Encodes the model as ONNX bytes (lazy initializers read in).
pub fn save_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut proto = model_to_proto(model);
    inline_lazy(&mut proto, model)?;
    let size = proto.compute_size();
    if size > PROTOBUF_LIMIT {
        return Err(GraphError::Encode {
            detail: format!(
                "the model needs {size} bytes, over protobuf's 2 GiB limit (saved to a file, it gets external data)"
            ),
        });
    }
    proto.write_to_bytes().map_err(|e| GraphError::Encode { detail: e.to_string() })
}

/// Writes the model to `path` atomically; see [`save_proto`].
pub fn save_path(model: &Model, path: impl AsRef<Path>) -> Result<()> {
    save_proto(model_to_proto(model), model, path.as_ref())
}

/// Writes `proto` (made by [`model_to_proto`] from `model`, possibly rewritten since) to `path`
/// atomically. When it holds lazy initializers or would exceed protobuf's 2 GiB, every
/// initializer of at least 1 KiB goes to `NAME.data` beside it (ONNX external data: offsets
/// aligned to 4 KiB for tensors of 64 KiB and more, 64 bytes for smaller ones), lazy ones read
/// one at a time, so the data never sits in memory whole. The data file is renamed into place
/// before the model.
pub fn save_proto(proto: ModelProto, model: &Model, path: &Path) -> Result<()> {
    write_proto(proto, model, path, false)
}

/// [`save_path`], always with external data (as ONNX tools write models meant to be mapped).
pub fn save_path_with_external_data(model: &Model, path: impl AsRef<Path>) -> Result<()> {
    write_proto(model_to_proto(model), model, path.as_ref(), true)
}

fn write_proto(mut proto: ModelProto, model: &Model, path: &Path, external: bool) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| GraphError::Io { path: p, source }
    };
    let has_lazy = proto.graph.as_ref().is_some_and(|g| g.initializer.iter().any(is_lazy_placeholder));
    if !external && !has_lazy && proto.compute_size() <= PROTOBUF_LIMIT {
        let bytes = proto.write_to_bytes().map_err(|e| GraphError::Encode { detail: e.to_string() })?;
        return write_atomically(path, &bytes);
    }
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let data_name = format!("{file_name}.data");
    let data_path = path.with_file_name(&data_name);
    let tmp = path.with_file_name(format!(".{data_name}.{}.tmp", process_tag()));
    let written = (|| -> Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io(&tmp))?);
        let mut offset = 0u64;
        let Some(graph) = proto.graph.as_mut() else { return Ok(()) };
        for t in graph.initializer.iter_mut() {
            let bytes = if is_lazy_placeholder(t) {
                lazy_bytes(t, model)?
            } else if t.raw_data.len() >= EXTERNAL_MIN_BYTES {
                std::mem::take(&mut t.raw_data)
            } else {
                continue;
            };
            let align = if bytes.len() >= 64 << 10 { 4096 } else { 64 };
            let padding = offset.next_multiple_of(align) - offset;
            out.write_all(&vec![0u8; padding as usize]).map_err(io(&tmp))?;
            offset += padding;
            out.write_all(&bytes).map_err(io(&tmp))?;
            t.data_location = DataLocation::EXTERNAL.into();
            t.external_data = vec![
                string_pair("location", &data_name),
                string_pair("offset", &offset.to_string()),
                string_pair("length", &bytes.len().to_string()),
            ];
            offset += bytes.len() as u64;
        }
        let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let size = proto.compute_size();
    if size > PROTOBUF_LIMIT {
        let _ = std::fs::remove_file(&tmp);
        return Err(GraphError::Encode {
            detail: format!(
                "the model needs {size} bytes besides its external data, over protobuf's 2 GiB limit"
            ),
        });
    }
    let bytes = match proto.write_to_bytes() {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(GraphError::Encode { detail: e.to_string() });
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &data_path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&data_path)(e));
    }
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temp file next to `path`, syncs it, then renames it over `path`, so a reader
/// never sees a half-written file and an interrupted write leaves the old file intact.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| GraphError::Io { path: path.into(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", process_tag()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// The result files of one job, written as a set: each is written into a staging folder inside
/// the output folder, and [`OutputSet::commit`] renames them all into place at the end, so a job
/// that fails or is killed before then leaves the previous set whole (never new encodings beside
/// an old model). Beginning a set removes what runs that died left behind there (staging folders
/// and `.NAME.PID.tmp` files of processes no longer alive).
#[derive(Debug)]
pub struct OutputSet {
    dir: std::path::PathBuf,
    staging: std::path::PathBuf,
    committed: bool,
}

/// Prefix of staging folders.
const STAGING_PREFIX: &str = ".staging-";

impl OutputSet {
    /// Creates `dir` if needed, cleans up after dead runs, and opens a staging folder in it.
    pub fn begin(dir: &Path) -> Result<OutputSet> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| GraphError::Io { path: p, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        remove_leftovers(dir);
        let staging = dir.join(format!("{STAGING_PREFIX}{}", process_tag()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        Ok(OutputSet { dir: dir.to_path_buf(), staging, committed: false })
    }

    /// Where to write result file `name` (a plain file name) now; it reaches the output folder at
    /// [`OutputSet::commit`].
    pub fn staged(&mut self, name: &str) -> std::path::PathBuf {
        self.staging.join(name)
    }

    /// Where `name` will be once committed.
    pub fn final_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// The staging folder itself, for writers that choose their own file names: every file
    /// written there reaches the output folder at [`OutputSet::commit`].
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Moves every file written into the staging folder (named through [`OutputSet::staged`] or
    /// not) into the output folder and removes the staging folder.
    pub fn commit(mut self) -> Result<()> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| GraphError::Io { path: p, source }
        };
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&self.staging)
            .map_err(io(&self.staging))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let (from, to) = (self.staging.join(&name), self.dir.join(&name));
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(())
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// This process as `HOST-PID` (the host name with anything but letters, digits and `_` as `_`):
/// staging folders and temp files carry it, so processes on different machines sharing one
/// folder (cluster jobs on a network file system) never take each other's files for leftovers.
pub fn process_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
            .collect();
        format!("{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
    })
}

/// Removes staging folders and temporary files that processes of this host left behind when they
/// died (where `/proc` tells; elsewhere nothing is removed). Those of other hosts are theirs.
fn remove_leftovers(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Some((our_host, _)) = process_tag().rsplit_once('-') else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let tag = if let Some(t) = name.strip_prefix(STAGING_PREFIX) {
            t
        } else if let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
            rest.rsplit('.').next().unwrap_or_default()
        } else {
            continue;
        };
        // A bare PID, without a host, counts as this host's.
        let (host, pid) = tag.rsplit_once('-').unwrap_or((our_host, tag));
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if host == our_host && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let path = e.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

fn string_pair(k: &str, v: &str) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = k.to_string();
    e.value = v.to_string();
    e
}

fn graph_to_proto(g: &Graph) -> GraphProto {
    let mut p = GraphProto::new();
    p.name = g.name.clone();
    p.doc_string = g.doc_string.clone();
    for (_, n) in g.nodes() {
        let mut np = NodeProto::new();
        np.name = n.name.clone();
        np.op_type = n.op_type.clone();
        np.domain = n.domain.clone();
        np.doc_string = n.doc_string.clone();
        np.input =
            n.inputs().iter().map(|v| v.map_or_else(String::new, |v| g.value(v).name.clone())).collect();
        np.output =
            n.outputs().iter().map(|v| v.map_or_else(String::new, |v| g.value(v).name.clone())).collect();
        np.attribute = n.attrs.iter().map(|(name, a)| attribute_to_proto(name, a)).collect();
        p.node.push(np);
    }
    for v in g.initializers() {
        let val = g.value(v);
        match (&val.data, &val.lazy) {
            (Some(t), _) => p.initializer.push(tensor_to_proto(&val.name, t)),
            (None, Some(l)) => {
                let mut t = TensorProto::new();
                t.name = val.name.clone();
                t.dims = l.shape().iter().map(|&d| d as i64).collect();
                t.data_type = l.dtype().onnx_code();
                t.data_location = DataLocation::EXTERNAL.into();
                t.external_data = vec![string_pair("location", "")];
                p.initializer.push(t);
            }
            (None, None) => {}
        }
    }
    p.input = g.inputs().iter().map(|&v| value_info(g, v)).collect();
    p.output = g.outputs().iter().map(|&v| value_info(g, v)).collect();
    p.value_info = g
        .value_ids()
        .filter(|&v| {
            let val = g.value(v);
            matches!(val.source(), ValueSource::Node(_))
                && !g.is_output(v)
                && (val.dtype.is_some() || val.shape.is_some())
        })
        .map(|v| value_info(g, v))
        .collect();
    p
}

fn value_info(g: &Graph, v: ValueId) -> ValueInfoProto {
    let val = g.value(v);
    let mut vi = ValueInfoProto::new();
    vi.name = val.name.clone();
    let mut tt = TensorTypeProto::new();
    tt.elem_type = val.dtype.map_or(0, |d| d.onnx_code());
    if let Some(shape) = &val.shape {
        let mut sp = TensorShapeProto::new();
        sp.dim = shape
            .0
            .iter()
            .map(|d| {
                let mut dim = Dimension::new();
                match d {
                    Dim::Known(n) => dim.set_dim_value(*n as i64),
                    Dim::Symbol(s) if !s.is_empty() => dim.set_dim_param(s.clone()),
                    Dim::Symbol(_) => {}
                }
                dim
            })
            .collect();
        tt.shape = Some(sp).into();
    }
    let mut tp = TypeProto::new();
    tp.set_tensor_type(tt);
    vi.type_ = Some(tp).into();
    vi
}

/// Encodes a tensor as a `TensorProto` with little-endian `raw_data`.
pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.to_string();
    p.dims = t.shape().iter().map(|&d| d as i64).collect();
    p.data_type = t.dtype().onnx_code();
    p.raw_data = t.to_le_bytes();
    p
}

fn attribute_to_proto(name: &str, a: &Attribute) -> AttributeProto {
    let mut p = AttributeProto::new();
    p.name = name.to_string();
    let kind = match a {
        Attribute::Float(f) => {
            p.f = *f;
            AttributeType::FLOAT
        }
        Attribute::Int(i) => {
            p.i = *i;
            AttributeType::INT
        }
        Attribute::String(s) => {
            p.s = s.clone();
            AttributeType::STRING
        }
        Attribute::Tensor(t) => {
            p.t = Some(tensor_to_proto("", t)).into();
            AttributeType::TENSOR
        }
        Attribute::Graph(g) => {
            p.g = Some((**g).clone()).into();
            AttributeType::GRAPH
        }
        Attribute::Floats(f) => {
            p.floats = f.clone();
            AttributeType::FLOATS
        }
        Attribute::Ints(i) => {
            p.ints = i.clone();
            AttributeType::INTS
        }
        Attribute::Strings(s) => {
            p.strings = s.clone();
            AttributeType::STRINGS
        }
        Attribute::Tensors(ts) => {
            p.tensors = ts.iter().map(|t| tensor_to_proto("", t)).collect();
            AttributeType::TENSORS
        }
        Attribute::Graphs(gs) => {
            p.graphs = gs.clone();
            AttributeType::GRAPHS
        }
        Attribute::Verbatim(verbatim) => return (**verbatim).clone(),
    };
    p.type_ = kind.into();
    p
}

/// Reads the text file at `path`, refusing one longer than `max` bytes — counted while reading, so
/// a device or a growing file that reports no size cannot exhaust memory.
pub fn read_text_at_most(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(max.saturating_add(1)).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {max} bytes, the most this file may hold"),
        ));
    }
    Ok(text)
}
