//! A TCP proxy that can cut its links: the network partition of the chaos run and of
//! tests, since the kernel here has no netem and no toxiproxy package exists.
//!
//! While partitioned the proxy moves no bytes in either direction and connects nothing
//! new upstream, so both peers see what a dropped link looks like: writes that fill the
//! socket buffers and reads that never return. Healing lets the held bytes flow again.
//! Stranding cuts only the links open at that moment, for good, while new ones flow: a
//! failover that silently dropped the old paths.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied address, `listen` → `upstream`, and every link made through it.
pub struct FaultProxy {
    /// Where clients connect instead of `upstream`.
    pub listen: SocketAddr,
    cut: watch::Sender<Cut>,
    /// Numbers the links in the order they were accepted.
    links: Arc<AtomicU64>,
    /// Bytes read from either side while partitioned, which wait for the heal (a
    /// stranded link's are not counted: they never flow).
    held: Arc<AtomicU64>,
}

/// Which links hold their bytes.
#[derive(Clone, Copy, Default)]
struct Cut {
    /// Every link, and no new one connects upstream.
    partitioned: bool,
    /// The links numbered below this one, for good.
    stranded_below: u64,
}

impl Cut {
    fn holds(self, link: u64) -> bool {
        self.partitioned || link < self.stranded_below
    }
}

impl FaultProxy {
    /// Proxies `listen` to `upstream`, every link whole.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the fault proxy on {listen}"))?;
        Self::start_with(listener, upstream)
    }

    /// [`Self::start`] on a free loopback port, held from the bind on (no other test can
    /// take it in between).
    pub async fn start_on_loopback(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a free loopback port")?;
        Self::start_with(listener, upstream)
    }

    fn start_with(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listen = listener.local_addr().context("the fault proxy's address")?;
        let (cut, watching) = watch::channel(Cut::default());
        let links = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let (numbered, counted) = (Arc::clone(&links), Arc::clone(&held));
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                let link = Link {
                    number: numbered.fetch_add(1, Ordering::Relaxed),
                    cut: watching.clone(),
                    held: Arc::clone(&counted),
                };
                tokio::spawn(link.carry(inbound, upstream));
            }
        });
        Ok(Self {
            listen,
            cut,
            links,
            held,
        })
    }

    /// Cuts every link.
    pub fn partition(&self) {
        self.held.store(0, Ordering::Relaxed);
        self.cut.send_modify(|cut| cut.partitioned = true);
    }

    /// Lets the held bytes flow again; returns how many were held since
    /// [`Self::partition`]: 0 means no peer sent anything across the cut, so the
    /// partition was never felt. Stranded links stay cut.
    pub fn heal(&self) -> u64 {
        let held = self.held.load(Ordering::Relaxed);
        self.cut.send_modify(|cut| cut.partitioned = false);
        held
    }

    /// Cuts the links open now for good, without a reset; links made later flow.
    pub fn strand_open_links(&self) {
        let open_below = self.links.load(Ordering::Relaxed);
        self.cut.send_modify(|cut| cut.stranded_below = open_below);
    }
}

/// One link through the proxy.
struct Link {
    number: u64,
    cut: watch::Receiver<Cut>,
    held: Arc<AtomicU64>,
}

impl Link {
    /// Waits until this link's bytes may flow; false once the proxy is gone.
    async fn flows(&mut self) -> bool {
        let number = self.number;
        self.cut.wait_for(|cut| !cut.holds(number)).await.is_ok()
    }

    /// Copies bytes both ways until either side closes, holding them while cut.
    async fn carry(mut self, mut inbound: TcpStream, upstream: SocketAddr) {
        if !self.flows().await {
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
        loop {
            // Reading goes on while the link is cut, so that what a peer sends across it is
            // counted; what was read, and a peer's close, wait for the heal.
            tokio::select! {
                read = inbound_read.read(&mut from_client) => {
                    let Ok(n @ 1..) = read else { return self.closed().await };
                    self.count_if_partitioned(n);
                    if !self.flows().await
                        || outbound_write.write_all(&from_client[..n]).await.is_err()
                    {
                        return;
                    }
                }
                read = outbound_read.read(&mut from_server) => {
                    let Ok(n @ 1..) = read else { return self.closed().await };
                    self.count_if_partitioned(n);
                    if !self.flows().await
                        || inbound_write.write_all(&from_server[..n]).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    /// A peer closed its side: the other learns of it only once the link is whole again.
    async fn closed(&mut self) {
        let _ = self.flows().await;
    }

    /// Counts `bytes` read while the proxy is partitioned ([`FaultProxy::heal`]'s figure).
    fn count_if_partitioned(&self, bytes: usize) {
        if self.cut.borrow().partitioned {
            self.held.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Asserts that `sent` comes back to `client` within 5 s.
    async fn assert_echoed(client: &mut TcpStream, sent: &[u8; 4], what: &str) {
        let mut reply = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut reply))
            .await
            .unwrap_or_else(|_| panic!("no echo {what}"))
            .expect("read");
        assert_eq!(&reply, sent, "the echo {what}");
    }

    /// Asserts that no echo reaches `client` within 300 ms (a duration that must pass).
    async fn assert_nothing_arrives(client: &mut TcpStream, what: &str) {
        let mut reply = [0u8; 4];
        let read =
            tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut reply)).await;
        assert!(read.is_err(), "nothing arrives {what}");
    }

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
        let proxy = FaultProxy::start_on_loopback(echo_address)
            .await
            .expect("proxy");
        let listen = proxy.listen;
        let mut client = TcpStream::connect(listen).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        assert_echoed(&mut client, b"ping", "through the proxy").await;

        proxy.partition();
        client
            .write_all(b"pong")
            .await
            .expect("write while partitioned");
        assert_nothing_arrives(&mut client, "across a partition").await;

        assert_eq!(proxy.heal(), 4, "the bytes held by the partition");
        assert_echoed(&mut client, b"pong", "after healing").await;

        proxy.strand_open_links();
        client
            .write_all(b"lost")
            .await
            .expect("write while stranded");
        assert_nothing_arrives(&mut client, "across a stranded link").await;
        let mut later = TcpStream::connect(listen).await.expect("connect again");
        later.write_all(b"late").await.expect("write");
        assert_echoed(&mut later, b"late", "on a link made after the stranding").await;
        proxy.heal();
        assert_nothing_arrives(&mut client, "after a heal, a stranded link staying cut").await;
    }
}
