//! The `tern` command line: parses the command and hands it to its module in `src/cli/`.

mod cli;

use clap::{Parser, Subcommand};
use tern::kernels::ternary_matmul::ScaleStore;
use tern::quant::ActQuant;

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
    /// How packed GGUF weights keep their scales in memory: `f32` (2.25 bits per weight for a
    /// tern export, the file's values, fastest decode where measured) or `byte` (2.09 bits at
    /// 1024 columns, scales rounded to 5-10 mantissa bits; NOTES.md). Default: TERN_SCALES, else
    /// f32.
    #[arg(long, global = true, value_parser = ScaleStore::NAMES)]
    scales: Option<String>,
    /// How packed GGUF weights quantize their inputs, overriding the file's `tern.act_quant`:
    /// `none` (int8 per 32 values) or `per_token` (one int8 step per token: leaner kernels, but
    /// accurate only for a model trained with `act_quant = "per_token"`). Default:
    /// TERN_ACT_QUANT, else what the file records.
    #[arg(long, global = true, value_parser = ActQuant::NAMES)]
    act_quant: Option<String>,
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

/// Sets the loader's environment variable `var` from its flag, or refuses (exit 2) a value of
/// it that is not one of `names`.
fn pass_to_loader(var: &str, flag: Option<&str>, names: &[&str]) {
    if let Some(s) = flag {
        std::env::set_var(var, s);
    } else if let Some(v) = std::env::var_os(var) {
        let v = v.to_string_lossy();
        if !names.contains(&v.as_ref()) {
            eprintln!("error: {var}={v}: expected {}", names.join(" or "));
            std::process::exit(2);
        }
    }
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
    // Read by the loader, before any worker thread exists. The loader would take an unknown
    // name as the default: a typo must not pass silently into a measurement.
    pass_to_loader("TERN_SCALES", cli.scales.as_deref(), &ScaleStore::NAMES);
    pass_to_loader("TERN_ACT_QUANT", cli.act_quant.as_deref(), &ActQuant::NAMES);
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
