//! GGUF, the file format llama.cpp runs: tern's reader/writer, export of a checkpoint, checks of
//! an exported file, and loading one for packed inference.
//!
//! - [`file`]: GGUF v3 reader and writer (metadata, tensor infos, aligned data).
//! - [`export`]: checkpoint -> GGUF (llama.cpp's qwen3 names and metadata, the tokenizer).
//! - [`verify`]: GGUF -> checks against the source projection.
//! - [`load`]: GGUF -> `Qwen3` with packed 2-bit weights (CPU inference).
//!
//! Tensor names come from `model::params` (the one name table), the 2-bit block codec and the
//! ggml type ids of Q2_0 / PQ2_0 from `quant::codec`.

pub mod export;
pub mod file;
pub mod load;
pub mod verify;

pub use export::{export_gguf, ExportReport, Format};
pub use file::GgufFile;
pub use load::{config_from_gguf, is_ternary, latents_from_gguf, load_model, tokenizer_from_gguf};
pub use verify::{verify_gguf, TensorCheck};
