//! Integration tests of the projector against the real NATS JetStream and Redis; each
//! test has its own stream, durable consumer and Redis key prefix (see `testkit`), and
//! runs the projector in this process.

mod apply;
mod dead_letters;
mod eviction;
mod lifecycle;
mod metrics;
mod projection;
mod redelivery;
mod redis_restart;
mod replay;
mod stream_loss;
mod support;
