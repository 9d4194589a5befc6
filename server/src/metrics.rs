//! Prometheus metrics, served at `/metrics` in the text format.

use bitnet_runtime::KvUsage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub prefix_cache_tokens: Counter,
    pub cancelled: Counter,
    pub ttft_seconds: Histogram,
    pub itl_seconds: Histogram,
    pub request_seconds: Histogram,
    pub queued: Gauge,
    /// `--max-queue`: the queue length at which requests get 503.
    pub queue_capacity: Gauge,
    pub running: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_total: Gauge,
    pub kv_blocks_cached: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bitnet");
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            prefix_cache_tokens: Counter::default(),
            cancelled: Counter::default(),
            ttft_seconds: latency(),
            itl_seconds: latency(),
            request_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            queued: Gauge::default(),
            queue_capacity: Gauge::default(),
            running: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "HTTP requests by endpoint and status", m.requests.clone());
        registry.register("prompt_tokens", "Prompt tokens of accepted generation requests", m.prompt_tokens.clone());
        registry.register("generated_tokens", "Tokens generated", m.generated_tokens.clone());
        registry.register("prefix_cache_tokens", "Prompt tokens reused from the prefix cache", m.prefix_cache_tokens.clone());
        registry.register("cancelled_requests", "Requests dropped because the client went away", m.cancelled.clone());
        registry.register("time_to_first_token_seconds", "From admission to the first generated token", m.ttft_seconds.clone());
        registry.register("inter_token_latency_seconds", "Between consecutive generated tokens of a request", m.itl_seconds.clone());
        registry.register("request_duration_seconds", "From admission to the last token", m.request_seconds.clone());
        registry.register("queue_length", "Sequences waiting for a slot (a request of n choices is n)", m.queued.clone());
        registry.register("queue_capacity", "Sequences that may wait (--max-queue; a request of n choices is n); more get 503", m.queue_capacity.clone());
        registry.register("running_sequences", "Sequences in the running batch", m.running.clone());
        registry.register("kv_blocks_used", "KV cache blocks held by sequences", m.kv_blocks_used.clone());
        registry.register("kv_blocks_total", "KV cache blocks in the budget", m.kv_blocks_total.clone());
        registry.register("kv_blocks_cached", "Free KV blocks that keep a prefix for reuse", m.kv_blocks_cached.clone());
        Metrics { registry, ..m }
    }

    pub fn set_load(&self, queued: usize, running: usize, kv: &KvUsage) {
        self.queued.set(queued as i64);
        self.running.set(running as i64);
        self.kv_blocks_used.set(kv.blocks_used as i64);
        self.kv_blocks_total.set(kv.blocks_total as i64);
        self.kv_blocks_cached.set(kv.blocks_cached as i64);
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_string(), status }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
