//! The devices list (`GET /v1/devices`) walked page by page while the index changes
//! under it: index writes between and during pages, an index full of retired entries,
//! a rebuild between pages, and moves stamped by a projector whose clock lags.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use contract::event::TelemetryRecorded;
use contract::read_model::{listing_granule, DeviceKeys};
use contract::timestamp::{from_unix_millis, unix_millis};
use projector::apply::{Delivered, ReadModel};
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use testkit::{eventually, PrivateRedis, TestEnv};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::read_model::publish;
use crate::support::{Query, ReadSide, DEADLINE};

fn now_ms() -> i64 {
    unix_millis(OffsetDateTime::now_utc())
}

/// Writes to generation 1 of a test's read model as a projector does, stamping its
/// calls with whatever `now` the test gives.
struct Projecting {
    read_model: ReadModel,
    redis: MultiplexedConnection,
    sequence: Arc<AtomicU64>,
}

impl Projecting {
    /// Makes generation 1 live and writes to it.
    async fn start(env: &TestEnv) -> Self {
        env.set_live_generation(1).await;
        Self {
            read_model: ReadModel::new(env.settings.redis.prefix.clone(), 600_000),
            redis: env.redis().await,
            sequence: Arc::default(),
        }
    }

    /// Applies one reading per `(device, recorded at ms)` in one batch, as a projector
    /// whose clock says `now_ms`.
    async fn apply(&mut self, readings: &[(String, i64)], now_ms: i64) {
        let events: Vec<Delivered> = readings
            .iter()
            .map(|(device, recorded_ms)| Delivered {
                event: TelemetryRecorded::new(
                    Uuid::now_v7(),
                    device.clone(),
                    from_unix_millis(*recorded_ms).expect("in range"),
                    OffsetDateTime::now_utc(),
                    BTreeMap::from([("temperature".to_owned(), 21.5)]),
                ),
                stream_sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
                stored_at: OffsetDateTime::now_utc(),
            })
            .collect();
        // The count is not asserted: it is short when a script had to be loaded meanwhile.
        self.read_model
            .apply(&mut self.redis, &[1], &events, now_ms)
            .await
            .expect("applied");
    }

    /// Another writer to the same read model, on the same connection.
    fn clone_writer(&self) -> Self {
        Self {
            read_model: self.read_model.clone(),
            redis: self.redis.clone(),
            sequence: self.sequence.clone(),
        }
    }
}

/// Redis's clock, in milliseconds.
async fn redis_ms(env: &TestEnv) -> i64 {
    let (seconds, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut env.redis().await)
        .await
        .expect("TIME answered");
    seconds * 1000 + micros / 1000
}

/// Waits until Redis's clock has passed the millisecond it shows now: a walk begun
/// after that sees every index change made before (a walk sees what happened before
/// its first page's millisecond).
async fn redis_clock_moves_on(env: &TestEnv) {
    let then = redis_ms(env).await;
    eventually(DEADLINE, "Redis's clock to move on", || async {
        (redis_ms(env).await > then).then_some(())
    })
    .await;
}

/// `count` devices named `<name>-<index>`, each last seen 20 s before the one before,
/// applied to a live generation 1; and the query service, once Redis's clock moved on.
async fn listed(env: &TestEnv, name: &str, count: i64) -> (Projecting, Query) {
    let mut projecting = Projecting::start(env).await;
    let now = now_ms();
    let devices: Vec<(String, i64)> = (0..count)
        .map(|index| (format!("{name}-{index}"), now - 20_000 - index * 20_000))
        .collect();
    projecting.apply(&devices, now).await;
    let query = Query::spawn(&env.settings).await;
    redis_clock_moves_on(env).await;
    (projecting, query)
}

/// One page of the list: its status and body.
async fn page(query: &Query, limit: usize, cursor: Option<&str>) -> (u16, Value) {
    let path = match cursor {
        None => format!("/v1/devices?limit={limit}"),
        Some(cursor) => format!("/v1/devices?limit={limit}&cursor={cursor}"),
    };
    let response = query.get(&path).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The devices of a page.
fn devices_of(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|device| device["device_id"].as_str().expect("device id").to_owned())
        .collect()
}

/// Walks the whole list `limit` at a time from a page's cursor (a new walk with
/// `None`) and returns the devices in the order listed; at most `pages_max` pages.
async fn walk(
    query: &Query,
    limit: usize,
    mut cursor: Option<String>,
    pages_max: usize,
) -> Vec<String> {
    let mut listed = Vec::new();
    for _ in 0..pages_max {
        let (status, body) = page(query, limit, cursor.as_deref()).await;
        assert_eq!(status, 200, "a page of the walk: {body}");
        listed.extend(devices_of(&body));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return listed,
        }
    }
    panic!("the walk did not end within {pages_max} pages");
}

/// Asserts that no device is listed twice in `listed` (one walk), naming a few that are.
fn assert_listed_once(listed: &[String], walk: &str) {
    let mut seen = HashSet::new();
    let twice: Vec<&String> = listed
        .iter()
        .filter(|device| !seen.insert(*device))
        .collect();
    assert!(
        twice.is_empty(),
        "{walk}: {} of {} listings were of a device listed before, such as {:?}",
        twice.len(),
        listed.len(),
        &twice[..twice.len().min(5)]
    );
}

/// Every index call puts entries at the front of the list (which moves every later
/// entry one rank on) while walks go on: each page finds its place and reads on in one
/// step, so no device is listed twice or skipped however often the index changes.
#[tokio::test]
async fn a_walk_lists_every_device_once_while_index_writes_keep_coming_at_the_front() {
    const DEVICES: usize = 300;
    let env = TestEnv::new();
    let mut projecting = Projecting::start(&env).await;
    let now = now_ms();
    // Thirty granules behind now, ten devices each.
    let devices: Vec<(String, i64)> = (0..DEVICES)
        .map(|index| {
            let granules_ago = (index % 30) as i64 + 2;
            (format!("old-{index:03}"), now - granules_ago * 10_000)
        })
        .collect();
    projecting.apply(&devices, now).await;
    let query = Query::spawn(&env.settings).await;
    redis_clock_moves_on(&env).await;

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3)
        .map(|writer| {
            let mut projecting = projecting.clone_writer();
            let (stop, calls) = (stop.clone(), calls.clone());
            tokio::spawn(async move {
                for call in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // A new device each call: one more entry at the front.
                    let device = format!("front-{writer}-{call}");
                    projecting.apply(&[(device, now_ms())], now_ms()).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    eventually(DEADLINE, "the writers under way", || async {
        (calls.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;

    let before_the_walks = calls.load(Ordering::Relaxed);
    let walks = tokio::join!(
        walk(&query, 5, None, 1_000),
        walk(&query, 5, None, 1_000),
        walk(&query, 5, None, 1_000),
        walk(&query, 5, None, 1_000),
    );
    let walks = [walks.0, walks.1, walks.2, walks.3];
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer done");
    }
    assert!(
        calls.load(Ordering::Relaxed) >= before_the_walks + 20,
        "index calls kept coming during the walks"
    );
    for (number, listed) in walks.iter().enumerate() {
        assert_listed_once(listed, &format!("walk {number}"));
        let old: HashSet<&String> = listed
            .iter()
            .filter(|device| device.starts_with("old-"))
            .collect();
        assert_eq!(
            old.len(),
            DEVICES,
            "walk {number}: every device of before the walk"
        );
    }
    query.stop().await;
}

/// The sum of `usec` of every command in `INFO commandstats` but INFO itself, and the
/// commands processed but INFO: Redis's own account of the work done.
async fn redis_work(redis: &mut MultiplexedConnection) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("INFO answered");
    let (mut usec, mut calls) = (0, 0);
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|line| line.split_once(':'))
        else {
            continue;
        };
        if name == "info" {
            continue;
        }
        for stat in stats.split(',') {
            match stat.split_once('=') {
                Some(("usec", value)) => usec += value.parse::<u64>().expect("usec"),
                Some(("calls", value)) => calls += value.parse::<u64>().expect("calls"),
                _ => {}
            }
        }
    }
    (usec, calls)
}

/// Devices that report every 10 s leave ~60 retired entries each in the index for the
/// listing TTL, nearly all behind the live ones. A page looks at a bounded number of
/// entries, so no page (not even the last, which looks past the devices) reads the
/// whole index; walking on to `next_cursor: null` still lists every device once.
#[tokio::test]
async fn a_page_reads_a_bounded_part_of_an_index_full_of_retired_entries() {
    const DEVICES: usize = 1_000;
    const MOVES: i64 = 60;
    // Redis of the test's own: its command statistics count this test's work alone.
    let server = PrivateRedis::start(&[]);
    let mut env = TestEnv::new();
    env.settings.redis.url = server.url();
    let mut projecting = Projecting::start(&env).await;
    let now = now_ms();
    for moved in 0..MOVES {
        let recorded_ms = now - (MOVES - moved) * 10_000;
        let readings: Vec<(String, i64)> = (0..DEVICES)
            .map(|index| (format!("busy-{index:04}"), recorded_ms))
            .collect();
        projecting.apply(&readings, now).await;
    }
    let query = Query::spawn(&env.settings).await;
    redis_clock_moves_on(&env).await;

    // A full budget of 808 entries (limit 100) takes Redis about 1 ms (the script and
    // the commands it calls are each counted, so about 2 ms here); reading the whole
    // index (as the last page did before the budget) took 66 ms in 119,000 commands.
    // Redis's `usec` is time on the clock, so a moment the box takes Redis off the CPU
    // counts too (a page once took 20.3 ms in 29 commands on a loaded CI box): each
    // page is read three times (a page is only read, never cached) and its least time
    // counts, while a whole-index read would cost its tens of ms every time.
    let mut redis = env.redis().await;
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 1.. {
        assert!(page_number <= 1_000, "the walk ends");
        let (mut usec, mut commands, mut body) = (u64::MAX, 0, Value::Null);
        for _ in 0..3 {
            let (usec_before, commands_before) = redis_work(&mut redis).await;
            let (status, answer) = page(&query, 100, cursor.as_deref()).await;
            let (usec_after, commands_after) = redis_work(&mut redis).await;
            assert_eq!(status, 200, "{answer}");
            usec = usec.min(usec_after - usec_before);
            commands = commands.max(commands_after - commands_before);
            body = answer;
        }
        assert!(
            usec <= 20_000 && commands <= 1_000,
            "page {page_number} cost Redis {usec} µs in {commands} commands"
        );
        listed.extend(devices_of(&body));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_listed_once(&listed, "the walk");
    assert_eq!(listed.len(), DEVICES, "every device listed");
    query.stop().await;
    drop(env);
    drop(server);
}

/// A cursor belongs to its generation of the read model: after a rebuild switched to a
/// new one, the old walk's next page is refused (start again), never an empty last page
/// that would end the walk with devices missing.
#[tokio::test]
async fn a_cursor_from_before_a_rebuild_is_refused_rather_than_ending_the_walk() {
    let side = ReadSide::start().await;
    let (env, query) = (&side.env, &side.query);
    let now = now_ms();
    for index in 0..6 {
        let event = TelemetryRecorded::new(
            Uuid::now_v7(),
            format!("rebuilt-{index}"),
            from_unix_millis(now - 20_000 - index * 20_000).expect("in range"),
            OffsetDateTime::now_utc(),
            BTreeMap::from([("temperature".to_owned(), 1.0)]),
        );
        publish(
            &env.subjects,
            &side.jetstream,
            &event,
            &event.event_id.to_string(),
        )
        .await;
    }
    eventually(DEADLINE, "the six devices listed", || async {
        let (status, body) = page(query, 100, None).await;
        (status == 200 && devices_of(&body).len() == 6).then_some(())
    })
    .await;
    redis_clock_moves_on(env).await;
    let (status, first) = page(query, 2, None).await;
    assert_eq!(status, 200);
    assert_eq!(devices_of(&first), ["rebuilt-0", "rebuilt-1"]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();

    let before = env.generation().await.expect("a live generation");
    let after = projector::connect_rebuild(&env.settings)
        .await
        .expect("rebuild connects")
        .run(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("rebuild succeeds");
    assert!(after > before, "a new generation");

    let (status, body) = page(query, 2, Some(&cursor)).await;
    assert_eq!(
        (status, body["errors"][0]["field"].as_str()),
        (400, Some("cursor")),
        "the old walk's next page: {body}"
    );
    redis_clock_moves_on(env).await;
    let listed = walk(query, 2, None, 10).await;
    assert_eq!(listed.len(), 6, "a new walk lists every device: {listed:?}");
    side.stop().await;
}

/// A walk whose read model is gone altogether (Redis restarted empty, no rebuild yet)
/// is answered as a walk without a cursor is, `503` with `Retry-After`, not a `400`
/// "start again" whose new walk would fail too.
#[tokio::test]
async fn a_cursor_whose_read_model_is_gone_altogether_is_answered_503_not_400() {
    let env = TestEnv::new();
    let (_projecting, query) = listed(&env, "walked", 4).await;
    let (status, first) = page(&query, 2, None).await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();

    // What a Redis restarted empty shows: no live generation.
    let () = redis::cmd("DEL")
        .arg(contract::read_model::meta_key(&env.settings.redis.prefix))
        .query_async(&mut env.redis().await)
        .await
        .expect("deleted");
    for cursor in [None, Some(cursor.as_str())] {
        let path = match cursor {
            None => "/v1/devices?limit=2".to_owned(),
            Some(cursor) => format!("/v1/devices?limit=2&cursor={cursor}"),
        };
        let response = query.get(&path).await;
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["type"].as_str()),
            (
                503,
                Some("https://telemetry-pipeline.dev/problems/unavailable")
            ),
            "{path}: {body}"
        );
        assert!(retry_after.is_some(), "{path}: a 503 says when to retry");
    }
    query.stop().await;
}

/// A projector stamps its index call with its clock before the call reaches Redis; a
/// call stamped before a walk's first page but run after it must not make the device
/// vanish from both its old place (already retired) and its new one (before the page).
/// The index and the walk now both go by Redis's clock.
#[tokio::test]
async fn a_device_moved_after_the_first_page_by_a_call_stamped_before_it_is_still_listed() {
    let env = TestEnv::new();
    let (mut projecting, query) = listed(&env, "late", 6).await;

    let stamped_before = now_ms() - 1_000;
    let (status, first) = page(&query, 2, None).await;
    assert_eq!(status, 200);
    assert_eq!(devices_of(&first), ["late-0", "late-1"]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    // late-4, not listed yet, reports anew; its call was stamped before the first page.
    projecting
        .apply(&[("late-4".to_owned(), now_ms())], stamped_before)
        .await;

    let rest = walk(&query, 2, Some(cursor), 10).await;
    assert_eq!(
        rest,
        ["late-2", "late-3", "late-4", "late-5"],
        "the rest of the walk, as the list stood at its first page"
    );
    query.stop().await;
}

/// A device in the index whose hash is gone (evicted, or its generation being deleted
/// while the page is read) is left out of the page, not shown as seen in 1970 with no
/// samples.
#[tokio::test]
async fn a_listed_device_whose_figures_are_gone_is_left_out_not_shown_as_never_seen() {
    let env = TestEnv::new();
    let mut projecting = Projecting::start(&env).await;
    let now = now_ms();
    let devices: Vec<(String, i64)> = (0..3)
        .map(|index| (format!("gone-{index}"), now - 20_000 - index * 20_000))
        .collect();
    projecting.apply(&devices, now).await;
    let () = redis::cmd("DEL")
        .arg(DeviceKeys::stats_of(
            &env.settings.redis.prefix,
            1,
            "gone-1",
        ))
        .query_async(&mut env.redis().await)
        .await
        .expect("deleted");
    let query = Query::spawn(&env.settings).await;
    redis_clock_moves_on(&env).await;

    let (status, body) = page(&query, 10, None).await;
    assert_eq!(status, 200);
    assert_eq!(devices_of(&body), ["gone-0", "gone-2"], "{body}");
    query.stop().await;
}

/// A page may end on an entry that expires before the next one (a retired entry, when
/// its budget ran out): the walk goes on after the cursor's (granule, entry) by the
/// list's order, whether that entry is still in the index or not.
#[tokio::test]
async fn a_walk_goes_on_after_its_position_even_when_that_entry_is_gone() {
    let env = TestEnv::new();
    let mut projecting = Projecting::start(&env).await;
    let granule = listing_granule(now_ms()) - 60_000;
    // Ten devices in one granule (listed m-9 to m-0), two in the one before.
    let devices: Vec<(String, i64)> = (0..10)
        .map(|index| (format!("m-{index}"), granule + 1))
        .chain([
            ("a-0".to_owned(), granule - 10_000),
            ("a-1".to_owned(), granule - 10_000),
        ])
        .collect();
    projecting.apply(&devices, now_ms()).await;
    let query = Query::spawn(&env.settings).await;
    redis_clock_moves_on(&env).await;

    let (status, first) = page(&query, 2, None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(devices_of(&first), ["m-9", "m-8"]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let (walk_of, _) = cursor.rsplit_once('.').expect("a device part");
    let (generation_and_snapshot, _) = walk_of.rsplit_once('.').expect("a granule part");
    for (position, expected) in [
        // Between m-6 and m-5 in the granule: no such device.
        (format!("{granule}.m-55"), "m-5"),
        // Past every device of the granule.
        (format!("{granule}.a"), "a-1"),
        // Between the two granules.
        (format!("{}.zzz", granule - 5_000), "a-1"),
    ] {
        let forged = format!("{generation_and_snapshot}.{position}");
        let (status, body) = page(&query, 1, Some(&forged)).await;
        assert_eq!(status, 200, "after {position}: {body}");
        assert_eq!(devices_of(&body), [expected], "after {position}: {body}");
    }
    query.stop().await;
}
