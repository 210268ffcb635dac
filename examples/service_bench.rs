//! Load generator for a running `bdscan serve` on loopback: concurrent streamed uploads
//! (throughput, and the server's peak RSS sampled from /proc while they run), then job
//! status requests (requests per second, latency percentiles). Bounded in count; it
//! stops by itself. Prints one JSON object. Driven by scripts/service_bench.sh.
//!
//! service_bench BASE_URL SERVER_PID CLIENTS UPLOAD_MB STATUS_REQUESTS CONCURRENCY

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream;
use serde_json::{json, Value};

const CHUNK: usize = 1 << 20;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A body of `mb` MiB streamed chunk by chunk (never held whole), distinct per client and
/// per chunk: one pseudo-random MiB per client with the chunk number stamped in front.
fn generated_body(client: usize, mb: usize) -> reqwest::Body {
    let mut base = vec![0u8; CHUNK];
    let mut x = (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in base.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let chunks = (0..mb).map(move |i| {
        let mut chunk = base.clone();
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
    });
    reqwest::Body::wrap_stream(stream::iter(chunks))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, pid, clients, upload_mb, status_requests, concurrency] = &args[..] else {
        eprintln!("usage: service_bench BASE_URL SERVER_PID CLIENTS UPLOAD_MB STATUS_REQUESTS CONCURRENCY");
        std::process::exit(2);
    };
    let pid: u32 = pid.parse().unwrap();
    let (clients, upload_mb): (usize, usize) =
        (clients.parse().unwrap(), upload_mb.parse().unwrap());
    let (status_requests, concurrency): (usize, usize) = (
        status_requests.parse().unwrap(),
        concurrency.parse().unwrap(),
    );
    let client = reqwest::Client::new();

    // Uploads, with the server's RSS sampled every 20 ms.
    let rss_before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_before));
    let uploading = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, uploading) = (peak.clone(), uploading.clone());
        tokio::spawn(async move {
            while uploading.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let uploads: Vec<_> = (0..clients)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/blobs");
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .body(generated_body(i, upload_mb))
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "upload {i}: {}",
                    response.status()
                );
                response.json::<Value>().await.unwrap()["sha256"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let mut blobs = Vec::new();
    for upload in uploads {
        blobs.push(upload.await.unwrap());
    }
    let upload_seconds = started.elapsed().as_secs_f64();
    uploading.store(false, Ordering::Relaxed);
    sampler.await.unwrap();

    // A queued job to ask about (run the server with --workers 0 so it stays queued).
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&json!({ "model": blobs[0], "clean": blobs[0] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!("{base}/v1/jobs/{}", job["id"].as_str().expect("job id"));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < status_requests {
                    let t = Instant::now();
                    let response = client.get(&url).send().await.unwrap();
                    assert!(response.status().is_success());
                    response.bytes().await.unwrap();
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    let status_seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let total_mb = (clients * upload_mb) as f64;
    println!(
        "{}",
        json!({
            "clients": clients,
            "upload_mib_each": upload_mb,
            "upload_seconds": (upload_seconds * 100.0).round() / 100.0,
            "upload_mib_per_second": (total_mb / upload_seconds * 10.0).round() / 10.0,
            "server_rss_before_mib": rss_before / 1024,
            "server_peak_rss_mib": peak.load(Ordering::Relaxed) / 1024,
            "status_requests": latencies.len(),
            "status_concurrency": concurrency,
            "status_rps": (latencies.len() as f64 / status_seconds).round(),
            "status_p50_ms": (pct(0.50) * 100.0).round() / 100.0,
            "status_p99_ms": (pct(0.99) * 100.0).round() / 100.0,
        })
    );
}
