//! A batch: the sequences of one `generate` (or one stream, or one async request), submitted to
//! the engine together so continuous batching applies, and read back as one stream of events.
//! At most `max_in_flight` (the engine's `--max-waiting-requests`) are submitted at once and the
//! rest as earlier ones finish, so a batch of any size never meets the queue's 429.
//!
//! Dropping a batch, or [`Batch::abort`], drops its streams, which aborts their sequences and
//! frees their KV blocks within a step; a waiting reader (even one on another thread or in an
//! async task) is woken and sees the end of the batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{BoxStream, SelectAll};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pyo3::prelude::*;
use tokenizers::Tokenizer;
use tokio::runtime::Runtime;
use tokio::sync::{Mutex, Notify};
use tpserve_coordinator::api::{finish_vector, TokenTexts};
use tpserve_coordinator::engine::{
    EngineHandle, FinishReason, GenerateEvent, GenerateRequest, TokenLogprobs,
};

use crate::blocking::wait;

/// The sequences of a batch: those still to submit and the streams of those submitted.
pub struct Sequences {
    engine: EngineHandle,
    pending: VecDeque<(usize, GenerateRequest)>,
    running: SelectAll<BoxStream<'static, (usize, GenerateEvent)>>,
    in_flight: usize,
    max_in_flight: usize,
}

impl Sequences {
    /// Sequences numbered in the order given.
    pub fn new(engine: EngineHandle, requests: Vec<GenerateRequest>, max_in_flight: usize) -> Self {
        Self {
            engine,
            pending: requests.into_iter().enumerate().collect(),
            running: SelectAll::new(),
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The next event of any sequence, tagged with its number; `None` once every sequence ended.
    /// A request the engine refuses ends its sequence with that error.
    async fn next(&mut self) -> Option<(usize, GenerateEvent)> {
        while self.in_flight < self.max_in_flight {
            let Some((seq, request)) = self.pending.pop_front() else {
                break;
            };
            match self.engine.generate(request).await {
                Ok(stream) => {
                    self.running.push(stream.map(move |e| (seq, e)).boxed());
                    self.in_flight += 1;
                }
                Err(e) => return Some((seq, GenerateEvent::Error(e))),
            }
        }
        let event = self.running.next().await;
        if let Some((_, GenerateEvent::Finished { .. } | GenerateEvent::Error(_))) = &event {
            self.in_flight -= 1;
        }
        event
    }

    /// Drops every stream (aborting its sequence) and everything not yet submitted.
    fn clear(&mut self) {
        self.pending.clear();
        self.running = SelectAll::new();
        self.in_flight = 0;
    }
}

/// Set once by [`Batch::abort`]; wakes a reader waiting for an event.
#[derive(Default)]
struct Cancel {
    cancelled: AtomicBool,
    wake: Notify,
}

/// The next event, or `None` at the end of the batch or once it is aborted.
async fn next_event(
    sequences: &Mutex<Sequences>,
    cancel: &Cancel,
) -> Option<(usize, GenerateEvent)> {
    let mut sequences = sequences.lock().await;
    if cancel.cancelled.load(Ordering::Acquire) {
        sequences.clear();
        return None;
    }
    tokio::select! {
        event = sequences.next() => event,
        _ = cancel.wake.notified() => {
            sequences.clear();
            None
        }
    }
}

/// The log probabilities of one position for Python: the chosen token first, then the most
/// likely tokens other than it, each as `(token id, logprob, rank, decoded text)` (vLLM's
/// `Logprob`; the text as the HTTP API reports it). Raw values: a banned token is `-inf`.
pub type PositionTuple = Vec<(u32, f32, u32, String)>;

fn position_tuple(texts: &TokenTexts, lp: &TokenLogprobs) -> PositionTuple {
    let mut out = Vec::with_capacity(lp.top.len() + 1);
    out.push((lp.token_id, lp.logprob, lp.rank, texts.text(lp.token_id)));
    out.extend(
        lp.top
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| *id != lp.token_id)
            .map(|(i, &(id, logprob))| (id, logprob, i as u32 + 1, texts.text(id))),
    );
    out
}

/// A prompt's log probabilities: `None` for the first token (it has no context).
fn prompt_tuples(texts: &TokenTexts, lps: &[Option<TokenLogprobs>]) -> Vec<Option<PositionTuple>> {
    lps.iter()
        .map(|lp| lp.as_ref().map(|lp| position_tuple(texts, lp)))
        .collect()
}

/// One event for Python: `(sequence, new text, new token ids, the token's log probabilities,
/// the prompt's log probabilities, finish reason, error)`; a finish reason or an error ends the
/// sequence. Log probabilities come only when the request asked for them, the prompt's with the
/// first token.
type EventTuple = (
    usize,
    String,
    Vec<u32>,
    Option<PositionTuple>,
    Option<Vec<Option<PositionTuple>>>,
    Option<&'static str>,
    Option<String>,
);

fn event_tuple(tokenizer: &Tokenizer, (seq, event): (usize, GenerateEvent)) -> EventTuple {
    match event {
        GenerateEvent::Delta {
            text,
            token_ids,
            logprobs,
            prompt_logprobs,
        } => {
            // Only requests that asked for log probabilities pay for their tokens' texts.
            let texts = (logprobs.is_some() || prompt_logprobs.is_some())
                .then(|| TokenTexts::new(tokenizer));
            let texts = texts.as_ref();
            (
                seq,
                text,
                token_ids,
                logprobs
                    .as_ref()
                    .zip(texts)
                    .map(|(lp, t)| position_tuple(t, lp)),
                prompt_logprobs
                    .as_deref()
                    .zip(texts)
                    .map(|(lps, t)| prompt_tuples(t, lps)),
                None,
                None,
            )
        }
        GenerateEvent::Finished { reason, .. } => (
            seq,
            String::new(),
            Vec::new(),
            None,
            None,
            Some(reason_name(reason)),
            None,
        ),
        GenerateEvent::Error(e) => (
            seq,
            String::new(),
            Vec::new(),
            None,
            None,
            None,
            Some(e.to_string()),
        ),
    }
}

/// vLLM's (and OpenAI's) name of a finish reason.
fn reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// Seconds since the Unix epoch, as Python's `time.time()` (vLLM's `RequestMetrics` times).
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One finished sequence as `generate` returns it.
#[derive(Debug, Clone, Default)]
struct Completion {
    text: String,
    token_ids: Vec<u32>,
    /// Each generated token's, when asked for.
    logprobs: Option<Vec<PositionTuple>>,
    prompt_logprobs: Option<Vec<Option<PositionTuple>>>,
    /// An embedding request's pooled vector (normalized when the pooler says so).
    embedding: Option<Vec<f32>>,
    finish_reason: Option<&'static str>,
    error: Option<String>,
    first_token_time: Option<f64>,
    last_token_time: Option<f64>,
    finished_time: Option<f64>,
}

/// A finished sequence for Python: `(text, token ids, log probabilities, prompt log
/// probabilities, embedding, finish reason, error, (first token time, last token time,
/// finished time))`.
type CompletionTuple = (
    String,
    Vec<u32>,
    Option<Vec<PositionTuple>>,
    Option<Vec<Option<PositionTuple>>>,
    Option<Vec<f32>>,
    Option<&'static str>,
    Option<String>,
    (Option<f64>, Option<f64>, Option<f64>),
);

impl Completion {
    fn into_tuple(self) -> CompletionTuple {
        (
            self.text,
            self.token_ids,
            self.logprobs,
            self.prompt_logprobs,
            self.embedding,
            self.finish_reason,
            self.error,
            (
                self.first_token_time,
                self.last_token_time,
                self.finished_time,
            ),
        )
    }
}

/// vLLM's "Processed prompts" bar: drawn on standard error only when it is a terminal.
struct Progress {
    bar: ProgressBar,
    started: Instant,
    /// Sequences still running, per prompt.
    left: Vec<usize>,
    prompt_lens: Vec<usize>,
    input_tokens: usize,
    output_tokens: usize,
}

impl Progress {
    fn new(show: bool, prompt_of: &[usize], prompt_lens: &[usize]) -> Self {
        let mut left = vec![0; prompt_lens.len()];
        for &p in prompt_of {
            left[p] += 1;
        }
        let target = if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(prompt_lens.len() as u64), target);
        if let Ok(style) = ProgressStyle::with_template(
            "Processed prompts: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed}<{eta}, {per_sec}{msg}]",
        ) {
            bar.set_style(style.progress_chars("█▉ "));
        }
        Self {
            bar,
            started: Instant::now(),
            left,
            prompt_lens: prompt_lens.to_vec(),
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    fn tokens(&mut self, n: usize) {
        self.output_tokens += n;
    }

    fn sequence_ended(&mut self, prompt: usize) {
        self.left[prompt] -= 1;
        if self.left[prompt] > 0 {
            return;
        }
        self.input_tokens += self.prompt_lens[prompt];
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            ", est. speed input: {:.2} toks/s, output: {:.2} toks/s",
            self.input_tokens as f64 / secs,
            self.output_tokens as f64 / secs
        ));
        self.bar.inc(1);
    }
}

/// Which prompt each sequence of a batch belongs to, and each prompt's length in tokens.
pub struct Layout {
    /// The prompt of each sequence.
    pub prompt_of: Vec<usize>,
    pub prompt_lens: Vec<usize>,
    /// Embedding requests: L2-normalize the pooled vectors (the pooler's setting).
    pub normalize_embeddings: bool,
}

/// The sequences of one submission (see the module header).
#[pyclass(module = "tpserve._tpserve")]
pub struct Batch {
    runtime: Arc<Runtime>,
    /// The served tokenizer, for the texts of log probabilities' tokens.
    tokenizer: Arc<Tokenizer>,
    sequences: Arc<Mutex<Sequences>>,
    cancel: Arc<Cancel>,
    /// The prompt of each sequence.
    prompt_of: Vec<usize>,
    /// Each prompt's length in tokens.
    prompt_lens: Vec<usize>,
    normalize_embeddings: bool,
}

impl Batch {
    /// A batch of `sequences`, laid out over their prompts as `layout` says.
    pub fn new(
        runtime: Arc<Runtime>,
        tokenizer: Arc<Tokenizer>,
        sequences: Sequences,
        layout: Layout,
    ) -> Self {
        Self {
            runtime,
            tokenizer,
            sequences: Arc::new(Mutex::new(sequences)),
            cancel: Arc::default(),
            prompt_of: layout.prompt_of,
            prompt_lens: layout.prompt_lens,
            normalize_embeddings: layout.normalize_embeddings,
        }
    }
}

#[pymethods]
impl Batch {
    /// Runs every sequence to its end and returns them in order, drawing the progress bar when
    /// `use_tqdm` is set. Ctrl-C aborts the batch and raises `KeyboardInterrupt`.
    fn collect(&self, py: Python<'_>, use_tqdm: bool) -> PyResult<Vec<CompletionTuple>> {
        let mut progress = Progress::new(use_tqdm, &self.prompt_of, &self.prompt_lens);
        let (sequences, cancel, prompt_of) = (&self.sequences, &self.cancel, &self.prompt_of);
        let texts = TokenTexts::new(&self.tokenizer);
        let normalize = self.normalize_embeddings;
        let texts = &texts;
        let run = || async move {
            let mut out = vec![Completion::default(); prompt_of.len()];
            while let Some((seq, event)) = next_event(sequences, cancel).await {
                let c = &mut out[seq];
                match event {
                    GenerateEvent::Delta {
                        text,
                        token_ids,
                        logprobs,
                        prompt_logprobs,
                    } => {
                        let t = now();
                        c.first_token_time.get_or_insert(t);
                        c.last_token_time = Some(t);
                        c.text.push_str(&text);
                        progress.tokens(token_ids.len());
                        c.token_ids.extend(token_ids);
                        if let Some(lp) = &logprobs {
                            let position = position_tuple(texts, lp);
                            c.logprobs.get_or_insert_with(Vec::new).push(position);
                        }
                        if let Some(lps) = &prompt_logprobs {
                            c.prompt_logprobs = Some(prompt_tuples(texts, lps));
                        }
                    }
                    GenerateEvent::Finished {
                        reason, embedding, ..
                    } => {
                        c.embedding = embedding.map(|v| finish_vector(v, None, normalize));
                        c.finish_reason = Some(reason_name(reason));
                        c.finished_time = Some(now());
                        progress.sequence_ended(prompt_of[seq]);
                    }
                    GenerateEvent::Error(e) => {
                        c.error = Some(e.to_string());
                        c.finished_time = Some(now());
                        progress.sequence_ended(prompt_of[seq]);
                    }
                }
            }
            progress.bar.finish();
            out
        };
        match wait(py, &self.runtime, run) {
            Ok(out) => Ok(out.into_iter().map(Completion::into_tuple).collect()),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Waits for the next event (see [`EventTuple`]); `None` at the end of the batch. Ctrl-C
    /// aborts the batch and raises `KeyboardInterrupt`.
    fn next(&self, py: Python<'_>) -> PyResult<Option<EventTuple>> {
        let (sequences, cancel) = (&self.sequences, &self.cancel);
        match wait(py, &self.runtime, || next_event(sequences, cancel)) {
            Ok(event) => Ok(event.map(|e| event_tuple(&self.tokenizer, e))),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Calls `callback(event)` from an engine thread once the next event (or `None`) is there:
    /// the building block of `AsyncLLM`, whose callback hands the event to its asyncio loop.
    fn next_async(&self, callback: Py<PyAny>) {
        let (sequences, cancel) = (self.sequences.clone(), self.cancel.clone());
        let tokenizer = self.tokenizer.clone();
        self.runtime.spawn(async move {
            let event = next_event(&sequences, &cancel).await;
            let event = event.map(|e| event_tuple(&tokenizer, e));
            Python::with_gil(move |py| {
                if let Err(e) = callback.call1(py, (event,)) {
                    e.print(py);
                }
            });
        });
    }

    /// Aborts every sequence not yet ended; readers see the end of the batch.
    fn abort(&self) {
        self.cancel.cancelled.store(true, Ordering::Release);
        self.cancel.wake.notify_one();
        if let Ok(mut sequences) = self.sequences.try_lock() {
            sequences.clear();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.abort();
    }
}
