//! `/stats` reads a device's hash and its buckets hash at one instant. Sent as one
//! pipeline, the reads still run one by one, and Redis may run another client's command
//! between them (it reads a client's bytes as they arrive): a reading applied in between
//! showed in the windows and not in the all-time figures of the same document.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use contract::read_model::{meta_key, DeviceKeys};
use testkit::TestEnv;

use crate::support::{
    apply_reading, apply_reading_in, assert_problem, one_projected_reading, Query,
};

/// What an armed proxy waits for, and how it says so and is let go on.
struct Hold {
    marker: Vec<u8>,
    held: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

/// A TCP proxy in front of Redis, on threads of its own, that, once armed, forwards what
/// a client sends up to the first command naming the marker and holds the rest until
/// released.
struct HoldingProxy {
    address: std::net::SocketAddr,
    armed: Arc<Mutex<Option<Hold>>>,
}

impl HoldingProxy {
    fn start(redis: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let armed: Arc<Mutex<Option<Hold>>> = Arc::default();
        let shared = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let mut server = TcpStream::connect(redis).expect("redis reachable");
                let (mut to_client, mut from_server) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                });
                let armed = shared.clone();
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let read = match client.read(&mut buffer) {
                            Ok(0) | Err(_) => return,
                            Ok(read) => read,
                        };
                        let bytes = &buffer[..read];
                        let hold = {
                            let mut armed = armed.lock().expect("lock");
                            let found = armed.as_ref().and_then(|hold| {
                                bytes
                                    .windows(hold.marker.len())
                                    .position(|window| window == hold.marker)
                            });
                            found.and_then(|at| Some((at, armed.take()?)))
                        };
                        let Some((at, hold)) = hold else {
                            if server.write_all(bytes).is_err() {
                                return;
                            }
                            continue;
                        };
                        // The command naming the marker begins at the `*` of its RESP
                        // array, the last one before the marker.
                        let start = bytes[..at]
                            .windows(3)
                            .rposition(|window| window == b"\r\n*")
                            .map_or(0, |position| position + 2);
                        if server.write_all(&bytes[..start]).is_err() {
                            return;
                        }
                        let _ = hold.held.send(());
                        let _ = hold.release.recv_timeout(Duration::from_secs(30));
                        if server.write_all(&bytes[start..]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { address, armed }
    }

    /// Holds the next command naming `marker`: `held` says when the bytes before it went
    /// to Redis, and the rest follows once `release` sends.
    fn arm(&self, marker: &str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (held, held_signal) = mpsc::channel();
        let (release_signal, release) = mpsc::channel();
        *self.armed.lock().expect("lock") = Some(Hold {
            marker: marker.as_bytes().to_vec(),
            held,
            release,
        });
        (held_signal, release_signal)
    }
}

/// The address of the test's Redis, for a proxy to stand in front of.
fn redis_address(env: &TestEnv) -> std::net::SocketAddr {
    env.settings
        .redis
        .url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("redis url is an address")
}

/// A read that finds the read model switched to another generation (a rebuild's
/// switch) reads the device again there with the meta hash, in one transaction: should
/// the read model be lost in between (Redis restarted empty, flushed), that is a `503`
/// while it is rebuilt, as for any read, not a `404` for a device it knows.
#[tokio::test]
async fn a_read_model_lost_between_a_switch_and_the_read_again_is_a_503_not_a_404() {
    let env = TestEnv::new();
    one_projected_reading(&env, "d-0").await;
    apply_reading(&env, "d-1", 20.0, 2).await;
    let proxy = HoldingProxy::start(redis_address(&env));
    let mut settings = env.settings.clone();
    settings.redis.url = format!("redis://{}", proxy.address);
    let query = Query::spawn(&settings).await;
    // Read in generation 1, which query then takes for the live one.
    let (status, document) = query.stats("d-0", "").await;
    assert_eq!(status, 200, "{document}");

    // A rebuild made generation 2, with d-1 in it, and switched over.
    apply_reading_in(&env, 2, "d-1", 20.0, 2).await;
    env.set_live_generation(2).await;
    let (held, release) = proxy.arm(&DeviceKeys::new(&env.settings.redis.prefix, 2, "d-1").stats);
    let meanwhile = async {
        tokio::task::spawn_blocking(move || held.recv_timeout(Duration::from_secs(10)))
            .await
            .expect("the wait did not panic")
            .expect("the read again in generation 2 reached the proxy");
        // The read model is lost: no meta hash, no generation 2.
        let mut redis = env.redis().await;
        let mut lost = env.generation_keys(2).await;
        lost.push(meta_key(&env.settings.redis.prefix));
        let () = redis::cmd("DEL")
            .arg(&lost)
            .query_async(&mut redis)
            .await
            .expect("del");
        let _ = release.send(());
    };
    let (response, ()) = tokio::join!(query.get("/v1/devices/d-1/stats"), meanwhile);
    assert_problem(response, 503, "unavailable").await;
    query.stop().await;
}

/// A reading applied while `/stats` reads the device shows in all of the document or in
/// none of it: the all-time count and the 1 h window's (both readings are within the
/// hour) agree.
#[tokio::test]
async fn a_reading_applied_between_the_reads_of_one_stats_request_shows_in_all_of_it_or_none() {
    let env = TestEnv::new();
    one_projected_reading(&env, "d-1").await;
    let proxy = HoldingProxy::start(redis_address(&env));
    let mut settings = env.settings.clone();
    settings.redis.url = format!("redis://{}", proxy.address);
    let query = Query::spawn(&settings).await;

    let buckets = DeviceKeys::new(&env.settings.redis.prefix, 1, "d-1").buckets;
    let (held, release) = proxy.arm(&buckets);
    let meanwhile = async {
        tokio::task::spawn_blocking(move || held.recv_timeout(Duration::from_secs(10)))
            .await
            .expect("the wait did not panic")
            .expect("the read of the buckets reached the proxy");
        // Another reading of the device, applied by a projector meanwhile.
        apply_reading(&env, "d-1", 30.0, 2).await;
        let _ = release.send(());
    };
    let ((status, document), ()) = tokio::join!(query.stats("d-1", ""), meanwhile);
    assert_eq!(status, 200, "{document}");
    let temperature = &document["metrics"]["temperature"];
    assert_eq!(
        temperature["count"], temperature["windows"]["1h"]["count"],
        "one instant: {document}"
    );
    assert_eq!(document["sample_count"], temperature["count"], "{document}");
    query.stop().await;
}
