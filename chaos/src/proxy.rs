//! A TCP proxy that can cut its link: the network partition of the chaos run, since the
//! kernel here has no netem and no toxiproxy package exists.
//!
//! While partitioned the proxy moves no bytes in either direction and connects nothing
//! new upstream, so both peers see what a dropped link looks like: writes that fill the
//! socket buffers and reads that never return. Healing lets the held bytes flow again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied link, `listen` → `upstream`.
pub struct FaultProxy {
    pub listen: SocketAddr,
    partitioned: watch::Sender<bool>,
    /// Bytes read from either side while the link was cut, which waited for the heal.
    held: Arc<AtomicU64>,
}

impl FaultProxy {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the fault proxy on {listen}"))?;
        let (partitioned, watching) = watch::channel(false);
        let held = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                let link = carry(inbound, upstream, watching.clone(), Arc::clone(&counted));
                tokio::spawn(link);
            }
        });
        Ok(Self {
            listen,
            partitioned,
            held,
        })
    }

    /// Cuts the link.
    pub fn partition(&self) {
        self.held.store(0, Ordering::Relaxed);
        self.partitioned.send_replace(true);
    }

    /// Lets the held bytes flow again; returns how many were held since
    /// [`Self::partition`]: 0 means no peer sent anything across the cut, so the
    /// partition was never felt.
    pub fn heal(&self) -> u64 {
        let held = self.held.load(Ordering::Relaxed);
        self.partitioned.send_replace(false);
        held
    }
}

/// Copies bytes both ways until either side closes, holding them while partitioned.
async fn carry(
    mut inbound: TcpStream,
    upstream: SocketAddr,
    mut partitioned: watch::Receiver<bool>,
    held: Arc<AtomicU64>,
) {
    if partitioned.wait_for(|cut| !*cut).await.is_err() {
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (mut inbound_read, mut inbound_write) = inbound.split();
    let (mut outbound_read, mut outbound_write) = outbound.split();
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    let count_if_cut = |n: usize, partitioned: &watch::Receiver<bool>| {
        if *partitioned.borrow() {
            held.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    loop {
        // Reading goes on while the link is cut, so that what a peer sends across it is
        // counted; what was read, and a peer's close, wait for the heal.
        tokio::select! {
            read = inbound_read.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { return closed(&mut partitioned).await };
                count_if_cut(n, &partitioned);
                if partitioned.wait_for(|cut| !*cut).await.is_err()
                    || outbound_write.write_all(&from_client[..n]).await.is_err()
                {
                    return;
                }
            }
            read = outbound_read.read(&mut from_server) => {
                let Ok(n @ 1..) = read else { return closed(&mut partitioned).await };
                count_if_cut(n, &partitioned);
                if partitioned.wait_for(|cut| !*cut).await.is_err()
                    || inbound_write.write_all(&from_server[..n]).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// A peer closed its side: the other learns of it only once the link is whole again.
async fn closed(partitioned: &mut watch::Receiver<bool>) {
    let _ = partitioned.wait_for(|cut| !*cut).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_partition_holds_bytes_until_it_heals() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let echo_address = echo.local_addr().expect("echo address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let free = TcpListener::bind("127.0.0.1:0").await.expect("free port");
        let listen = free.local_addr().expect("address");
        drop(free);
        let proxy = FaultProxy::start(listen, echo_address)
            .await
            .expect("proxy");
        let mut client = TcpStream::connect(listen).await.expect("connect");
        let mut reply = [0u8; 4];
        client.write_all(b"ping").await.expect("write");
        client
            .read_exact(&mut reply)
            .await
            .expect("echo through the proxy");
        assert_eq!(&reply, b"ping");

        proxy.partition();
        client
            .write_all(b"pong")
            .await
            .expect("write while partitioned");
        let held =
            tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut reply)).await;
        assert!(held.is_err(), "nothing crosses a partition");

        assert_eq!(proxy.heal(), 4, "the bytes held by the partition");
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut reply))
            .await
            .expect("bytes flow again after healing")
            .expect("read");
        assert_eq!(&reply, b"pong");
    }
}
