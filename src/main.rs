//! The `tern` command line: parses the command and hands it to its module in `src/cli/`.

mod cli;

use clap::{Parser, Subcommand};
use tern::kernels::ternary_matmul::ScaleStore;

// Candle allocates and frees large tensors every op; the system allocator returns them to the OS
// (mmap/munmap) and page-faults them back in, which cost more CPU time than the math itself.
// Wrapped in a counter of live heap bytes for `tern bench kernels`.
#[global_allocator]
static GLOBAL: tern::mem::Counting<mimalloc::MiMalloc> = tern::mem::Counting(mimalloc::MiMalloc);

/// `mi_option_purge_delay` in mimalloc 2's `mi_option_e` (include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Even mimalloc gives freed pages back to the OS after 10 ms by default, and a training step
/// frees and re-allocates the same hundreds of MiB every few ms: the kernel then spends ~7% of
/// the step zeroing fresh pages (perf: clear_page_erms). Never purging keeps those pages; peak
/// RSS is what it was (measured in NOTES.md).
fn keep_freed_pages() {
    // SAFETY: sets one integer option of the allocator; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Train, run and export ternary language models (Qwen3 and Llama families)"
)]
struct Cli {
    /// Worker threads for every command (default: one per core, or RAYON_NUM_THREADS).
    #[arg(long, short = 't', global = true, value_parser = cli::at_least_one)]
    threads: Option<usize>,
    /// How packed GGUF weights keep their scales in memory: `f32` (2.5 bits per weight, the
    /// file's values, fastest decode where measured) or `byte` (2.09 bits at 1024 columns,
    /// scales rounded to 5-10 mantissa bits; NOTES.md). Default: TERN_SCALES, else f32.
    #[arg(long, global = true, value_parser = ScaleStore::NAMES)]
    scales: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train (or fine-tune) a ternary Qwen3 model from a TOML config.
    Train(cli::train::Args),
    /// Held-out perplexity of a model on a text file.
    Eval(cli::eval::Args),
    /// Generate text (greedy by default; llama-cli sampling flags).
    Generate(cli::generate::Args),
    /// Serve a model over the OpenAI HTTP API (continuous batching).
    Serve(cli::serve::Args),
    /// Chat with a model in the terminal (its chat template, streamed).
    Chat(cli::chat::Args),
    /// Export a checkpoint to GGUF (packed Q2_0 by default) for llama.cpp.
    Export(cli::export::Args),
    /// Check that a model's weights are ternary: a checkpoint's projection, or a GGUF's blocks
    /// (against the source checkpoint with --source). Exit 0 only when everything holds.
    Verify(cli::verify::Args),
    /// Draws the validation-loss curves of several runs into one PNG (ablations).
    Plot(cli::plot::Args),
    /// The compiled backends, the devices that open, the CPU's kernel ISA.
    Info(cli::info::Args),
    /// Tokenizers for from-scratch models (`tern tokenizer train`).
    Tokenizer {
        #[command(subcommand)]
        what: cli::tokenizer::Cmd,
    },
    /// Benchmarks (figures for NOTES.md).
    Bench {
        #[command(subcommand)]
        what: cli::bench::Cmd,
    },
}

/// Runs `f` on a worker of a pool of `threads` (rayon's parallel work, candle's GEMMs): the
/// command's own thread is then a worker, so a parallel op started from it needs no hand-off to
/// a sleeping thread (with one thread: none at all). Decoding starts ~200 such ops per token.
fn run_in_pool(
    threads: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<i32> + Send,
) -> anyhow::Result<i32> {
    if let Some(n) = threads {
        // candle sizes its GEMMs by this variable; read before any worker exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle-core 0.11 runs its elementwise ops on a pool of its own (`candle-bp-*` threads,
    // one per core but one, that spin ~25,000 times after each op before parking). Beside
    // rayon's workers that thread takes a core from the matmuls: 12% of the samples of a
    // 2-thread 0.6B prefill, which ran 206-225 tok/s with it and 230-253 without (Zen 4).
    // With one candle thread its ops run inline on the calling worker (an explicit
    // CANDLE_NUM_THREADS is kept).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()?;
    pool.install(f)
}

fn main() {
    keep_freed_pages();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(s) = &cli.scales {
        // Read once by the loader (`ScaleStore::chosen`), before any worker thread exists.
        std::env::set_var("TERN_SCALES", s);
    } else if let Some(v) = std::env::var_os("TERN_SCALES") {
        // The loader would take an unknown name as f32: a typo must not pass silently into a
        // measurement.
        let v = v.to_string_lossy();
        if ScaleStore::from_name(&v).is_none() {
            eprintln!(
                "error: TERN_SCALES={v}: expected {}",
                ScaleStore::NAMES.join(" or ")
            );
            std::process::exit(2);
        }
    }
    let res = run_in_pool(cli.threads, move || match cli.cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Chat(a) => cli::chat::run(a),
        Cmd::Export(a) => cli::export::run(a),
        Cmd::Verify(a) => cli::verify::run(a),
        Cmd::Plot(a) => cli::plot::run(a),
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Tokenizer { what } => cli::tokenizer::run(what),
        Cmd::Bench { what } => cli::bench::run(what),
    });
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
