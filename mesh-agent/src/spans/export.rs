//! Finished spans on their way to the collector: a bounded queue the data
//! path only ever `try_send`s into, and one thread of its own that sends
//! batches over OTLP (encoding a batch, connecting and retrying never take
//! a turn from the runtime that serves requests). A slow or absent collector costs spans, never requests: when the
//! queue is full a span is dropped and counted, and a batch the collector
//! did not take is counted as dropped too.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::{
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use prometheus::{IntCounterVec, Opts, core::Collector};
use tokio::sync::mpsc;

/// Spans sent in one export at most.
const BATCH_SPANS: usize = 512;
/// A batch that is not full leaves after this long.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// `mesh_trace_spans_total{result}`: every span that ended, by what became
/// of it.
#[derive(Clone)]
pub struct SpanCounters {
    spans: IntCounterVec,
}

/// What became of a finished span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanFate {
    /// The collector accepted it.
    Exported,
    /// The queue was full (the collector is slow or away).
    DroppedQueueFull,
    /// Its batch failed: the collector refused it, or could not be reached
    /// within the export timeout.
    DroppedExportFailed,
}

impl SpanFate {
    fn as_label(self) -> &'static str {
        match self {
            SpanFate::Exported => "exported",
            SpanFate::DroppedQueueFull => "dropped_queue_full",
            SpanFate::DroppedExportFailed => "dropped_export_failed",
        }
    }
}

impl Default for SpanCounters {
    fn default() -> Self {
        Self {
            spans: IntCounterVec::new(
                Opts::new(
                    "mesh_trace_spans_total",
                    "Request spans sampled and ended, by result: exported, dropped_queue_full, dropped_export_failed",
                ),
                &["result"],
            )
            .expect("valid metric"),
        }
    }
}

impl SpanCounters {
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.spans.clone())]
    }

    fn count(&self, fate: SpanFate, spans: usize) {
        self.spans
            .with_label_values(&[fate.as_label()])
            .inc_by(spans as u64);
    }

    /// The spans counted with `fate` so far.
    pub fn get(&self, fate: SpanFate) -> u64 {
        self.spans.with_label_values(&[fate.as_label()]).get()
    }
}

/// The SDK's span processor: ended spans go into the queue, or are
/// dropped at once if it is full.
pub struct ExportQueue {
    queue: mpsc::Sender<SpanData>,
    counters: SpanCounters,
}

impl std::fmt::Debug for ExportQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportQueue")
            .field("capacity", &self.queue.max_capacity())
            .finish()
    }
}

impl ExportQueue {
    /// Starts the export thread, which builds its exporter with `exporter`
    /// (on the thread's own Tokio runtime: a gRPC channel's tasks live
    /// there) and sends to it; at most `capacity` spans wait. Fails if the
    /// exporter cannot be built.
    pub fn start<E, B>(exporter: B, capacity: usize, counters: SpanCounters) -> anyhow::Result<Self>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> anyhow::Result<E> + Send + 'static,
    {
        let (queue, spans) = mpsc::channel(capacity.max(1));
        let (built, ready) = std::sync::mpsc::channel();
        let task_counters = counters.clone();
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || {
                yield_to_requests();
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = built.send(Err(anyhow::Error::from(err)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match exporter() {
                        Ok(exporter) => {
                            let _ = built.send(Ok(()));
                            export_batches(exporter, spans, task_counters).await;
                        }
                        Err(err) => {
                            let _ = built.send(Err(err));
                        }
                    }
                });
            })?;
        ready
            .recv()
            .map_err(|_| anyhow::anyhow!("the span export thread ended at start"))??;
        Ok(Self { queue, counters })
    }
}

/// The export thread runs at a lower priority (nice 10) than the threads
/// serving requests: on a loaded node, encoding and sending spans waits,
/// requests do not (spans queue, and are dropped and counted if it comes
/// to that).
fn yield_to_requests() {
    // SAFETY: plain system calls on this thread's own id.
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) != 0
    };
    if failed {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the span export thread keeps the agent's priority"
        );
    }
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.counters.count(SpanFate::DroppedQueueFull, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // The thread ends when the provider (the only sender) is dropped.
        Ok(())
    }
}

/// Sends the queued spans in batches of up to [`BATCH_SPANS`], at least
/// every [`BATCH_DELAY`] while spans wait; one export at a time, each
/// bounded by the exporter's timeout.
async fn export_batches<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    counters: SpanCounters,
) {
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    loop {
        // Wait for the first span of a batch, then fill it for a while.
        match spans.recv().await {
            Some(span) => batch.push(span),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_SPANS {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        export(&exporter, &mut batch, &counters).await;
    }
    if !batch.is_empty() {
        export(&exporter, &mut batch, &counters).await;
    }
}

async fn export<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, counters: &SpanCounters) {
    let spans = batch.len();
    let sent = std::mem::replace(batch, Vec::with_capacity(BATCH_SPANS));
    match exporter.export(sent).await {
        Ok(()) => counters.count(SpanFate::Exported, spans),
        Err(error) => {
            counters.count(SpanFate::DroppedExportFailed, spans);
            log_export_failure(&error, spans);
        }
    }
}

/// One warning per failing stretch would be kinder to the log than one per
/// batch; a batch leaves at most twice a second, so per batch is bounded.
fn log_export_failure(error: &OTelSdkError, spans: usize) {
    tracing::warn!(spans, error = %error, "spans not exported: the collector did not take them; dropped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    #[derive(Debug, Default)]
    struct Collector {
        accept: AtomicBool,
        /// Exports block until this is set.
        open: tokio::sync::Notify,
        blocked: AtomicBool,
        received: AtomicUsize,
    }

    #[derive(Debug, Clone)]
    struct TestExporter(Arc<Collector>);

    impl SpanExporter for TestExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.0.blocked.load(Ordering::SeqCst) {
                self.0.open.notified().await;
            }
            if self.0.accept.load(Ordering::SeqCst) {
                self.0.received.fetch_add(batch.len(), Ordering::SeqCst);
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure("collector away".into()))
            }
        }
    }

    fn span(sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(7u128),
                SpanId::from(9u64),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "GET".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !what() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 10 s");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_a_failed_export_counts_its_batch() {
        let collector = Arc::new(Collector::default());
        collector.blocked.store(true, Ordering::SeqCst);
        let counters = SpanCounters::default();
        let exporter = TestExporter(collector.clone());
        let queue = ExportQueue::start(move || Ok(exporter), 4, counters.clone()).unwrap();
        // The first span is taken by the export task, which then blocks in
        // the export; four more fill the queue, the rest are dropped.
        queue.on_end(span(true));
        tokio::time::sleep(BATCH_DELAY * 2).await;
        for _ in 0..10 {
            queue.on_end(span(true));
        }
        // Unsampled spans are not the queue's business.
        queue.on_end(span(false));
        assert_eq!(counters.get(SpanFate::DroppedQueueFull), 6);
        collector.blocked.store(false, Ordering::SeqCst);
        collector.open.notify_one();
        until(|| counters.get(SpanFate::DroppedExportFailed) == 5).await;
        collector.accept.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            queue.on_end(span(true));
        }
        until(|| counters.get(SpanFate::Exported) == 3).await;
        assert_eq!(collector.received.load(Ordering::SeqCst), 3);
    }
}
