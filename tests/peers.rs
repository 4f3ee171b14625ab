//! Peer fill: a fleet of `imgcache serve` processes on one real PostgreSQL
//! server, in front of one origin that counts its requests and sends at a
//! limited rate (a thin link). Real processes, real sockets, a real HTTP
//! client; SIGKILL for the node that dies. Skipped with a message where no
//! PostgreSQL server can be had, unless `IMGCACHE_REQUIRE_POSTGRES` is set.

mod fleet_kit;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use fleet_kit::{data, database, runtime, stampede, token_file, unique, Node, Origin};

#[test]
fn a_fleet_stampede_makes_one_origin_request_and_every_node_a_copy() {
    let Some(db) = database() else { return };
    let id = unique("stampede");
    let image = data(8 << 20, 1);
    runtime().block_on(async {
        let origin = Origin::start(HashMap::from([(id.clone(), image.clone())]), 16 << 20).await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(Node::start(&db, &origin, &token, 4).await);
        }
        let client = reqwest::Client::new();
        let refs: Vec<&Node> = nodes.iter().collect();
        let bodies = stampede(&client, &refs, &id, 100).await;
        assert_eq!(bodies.len(), 100);
        for b in &bodies {
            assert!(b[..] == image[..], "a body differs from the image");
        }
        assert_eq!(
            origin.gets(),
            1,
            "the origin served the image more than once"
        );
        assert_eq!(origin.bytes.load(Ordering::SeqCst), image.len() as u64);
        // Each node committed its own copy before its clients' last byte.
        let mut want: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        want.sort();
        assert_eq!(nodes[0].holders(&client, &id).await, want);
        let mut peer_fills = 0.0;
        for n in &nodes {
            peer_fills += n
                .metric(&client, "imgcache_peer_events_total{event=\"fill\"} ")
                .await;
        }
        assert!(
            peer_fills >= 2.0,
            "two nodes filled from peers ({peer_fills})"
        );
        // A fourth node, late: it fills from a holder, not the origin.
        let late = Node::start(&db, &origin, &token, 4).await;
        let again = stampede(&client, &[&late], &id, 3).await;
        assert!(again.iter().all(|b| b[..] == image[..]));
        assert_eq!(origin.gets(), 1);
    });
}

#[test]
fn the_filling_node_killed_mid_fill_costs_its_followers_nothing() {
    let Some(db) = database() else { return };
    let id = unique("killed");
    let image = data(8 << 20, 2);
    runtime().block_on(async {
        // The origin holds the leader's transfer after its first MiB until
        // released: the fill is certainly in progress when it dies.
        let origin = Origin::start_held(
            HashMap::from([(id.clone(), image.clone())]),
            64 << 20,
            Some(1 << 20),
        )
        .await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        let mut leader = Node::start(&db, &origin, &token, 4).await;
        let b = Node::start(&db, &origin, &token, 4).await;
        let c = Node::start(&db, &origin, &token, 4).await;
        let client = reqwest::Client::new();
        // The leader's client: it starts the fleet's one fill.
        let first = {
            let url = leader.image(&id);
            let client = client.clone();
            tokio::spawn(async move { client.get(&url).send().await.map(|r| r.status()) })
        };
        origin.wait_gets(1).await;
        // Ten clients on each of the others, following the leader through
        // their nodes; each has its first bytes before the kill.
        let mut responses = Vec::new();
        for node in [&b, &c] {
            for _ in 0..10 {
                let mut r = client.get(node.image(&id)).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let chunk = r.chunk().await.unwrap().expect("a first chunk");
                responses.push((chunk, r));
            }
        }
        leader.child.start_kill().unwrap();
        leader.child.wait().await.unwrap();
        origin.release();
        let _ = first.await;
        for (first_chunk, mut r) in responses {
            let mut body = first_chunk.to_vec();
            while let Some(chunk) = r.chunk().await.unwrap() {
                body.extend_from_slice(&chunk);
            }
            assert!(
                body == image,
                "a follower's body differs ({} bytes)",
                body.len()
            );
        }
        assert!(
            origin.gets() <= 2,
            "{} origin requests for one image and one death",
            origin.gets()
        );
        // The one that took over resumed where the fleet had got to.
        assert_eq!(origin.ranged.load(Ordering::SeqCst), origin.gets() - 1);
        let mut want = vec![b.url.clone(), c.url.clone()];
        want.sort();
        assert_eq!(b.holders(&client, &id).await, want);
        let failovers = b
            .metric(&client, "imgcache_peer_events_total{event=\"failover\"} ")
            .await
            + c.metric(&client, "imgcache_peer_events_total{event=\"failover\"} ")
                .await;
        assert!(failovers >= 1.0, "no failover counted");
    });
}

#[test]
fn a_corrupt_copy_is_never_served_to_a_peer_and_a_dead_node_is_skipped() {
    let Some(db) = database() else { return };
    let id = unique("corrupt");
    let other = unique("dead");
    let image = data(2 << 20, 3);
    runtime().block_on(async {
        let origin = Origin::start(
            HashMap::from([(id.clone(), image.clone()), (other.clone(), image.clone())]),
            256 << 20,
        )
        .await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        let a = Node::start(&db, &origin, &token, 4).await;
        let client = reqwest::Client::new();
        assert!(stampede(&client, &[&a], &id, 1).await[0][..] == image[..]);
        assert_eq!(origin.gets(), 1);
        // A's copy rots on disk, its size unchanged.
        let path = a.dir.path().join(&id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1 << 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        // B asks A, which checks its copy first: quarantined, never sent;
        // B goes to the origin.
        let b = Node::start(&db, &origin, &token, 4).await;
        assert!(stampede(&client, &[&b], &id, 2)
            .await
            .iter()
            .all(|x| x[..] == image[..]));
        assert_eq!(origin.gets(), 2);
        assert!(
            a.dir.path().join("invalid").join(&id).exists(),
            "not quarantined"
        );
        assert_eq!(b.holders(&client, &id).await, vec![b.url.clone()]);
        // A's clients get the image again — from B now, a holder.
        assert!(stampede(&client, &[&a], &id, 1).await[0][..] == image[..]);
        assert_eq!(origin.gets(), 2);

        // A node that is gone, its rows still in the database: skipped.
        let mut dead = Node::start(&db, &origin, &token, 4).await;
        assert!(stampede(&client, &[&dead], &other, 1).await[0][..] == image[..]);
        assert_eq!(origin.gets(), 3);
        dead.child.start_kill().unwrap();
        dead.child.wait().await.unwrap();
        let fresh = Node::start(&db, &origin, &token, 4).await;
        assert!(stampede(&client, &[&fresh], &other, 2)
            .await
            .iter()
            .all(|x| x[..] == image[..]));
        assert_eq!(
            origin.gets(),
            4,
            "the dead node's row skipped, the origin asked"
        );
    });
}

#[test]
fn peer_requests_need_the_fleet_token() {
    let Some(db) = database() else { return };
    let id = unique("token");
    let other = unique("not-here");
    let image = data(1 << 20, 4);
    runtime().block_on(async {
        let origin = Origin::start(
            HashMap::from([(id.clone(), image.clone()), (other.clone(), image.clone())]),
            256 << 20,
        )
        .await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        let wrong = token_file(secrets.path(), "wrong", "not-the-fleet");
        let a = Node::start(&db, &origin, &token, 4).await;
        let client = reqwest::Client::new();
        assert!(stampede(&client, &[&a], &id, 1).await[0][..] == image[..]);
        // A peer's request with a wrong token, or none but the header.
        for given in ["not-the-fleet", ""] {
            let r = client
                .get(a.image(&id))
                .header("x-imgcache-peer-token", given)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{given:?}");
        }
        // With the token, a peer gets the bytes, and a range of them.
        let r = client
            .get(a.image(&id))
            .header("x-imgcache-peer-token", "fleet-secret")
            .header("range", "bytes=1000-")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(r.bytes().await.unwrap()[..] == image[1000..]);
        // A peer asking for what the node neither holds nor fills (the
        // origin has it) gets a 404 — never a fill of the node's own.
        let r = client
            .get(a.image(&other))
            .header("x-imgcache-peer-token", "fleet-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(origin.gets(), 1);
        // A node with the wrong token is refused by A, and fills from the
        // origin.
        let outsider = Node::start(&db, &origin, &wrong, 4).await;
        assert!(stampede(&client, &[&outsider], &id, 1).await[0][..] == image[..]);
        assert_eq!(origin.gets(), 2);
        assert!(
            a.metric(&client, "imgcache_peer_events_total{event=\"refused\"} ")
                .await
                >= 3.0
        );
    });
}

#[test]
fn a_node_serves_at_most_its_fanout_and_the_image_spreads_as_a_tree() {
    let Some(db) = database() else { return };
    let id = unique("fanout");
    let image = data(8 << 20, 5);
    runtime().block_on(async {
        // Four seconds of fill: every follower asks while it runs.
        let origin = Origin::start(HashMap::from([(id.clone(), image.clone())]), 2 << 20).await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        let leader = Node::start(&db, &origin, &token, 1).await;
        let mut followers = Vec::new();
        for _ in 0..4 {
            followers.push(Node::start(&db, &origin, &token, 1).await);
        }
        let client = reqwest::Client::new();
        let first = {
            let (client, url) = (client.clone(), leader.image(&id));
            tokio::spawn(async move { client.get(&url).send().await.unwrap().bytes().await })
        };
        origin.wait_gets(1).await;
        let refs: Vec<&Node> = followers.iter().collect();
        let bodies = stampede(&client, &refs, &id, 8).await;
        assert!(bodies.iter().all(|b| b[..] == image[..]));
        assert!(first.await.unwrap().unwrap()[..] == image[..]);
        assert_eq!(origin.gets(), 1);
        // Each follower filled once from a peer. With a fan-out of one, a
        // transfer from the filling leader lasts as long as its fill: the
        // others were told it was busy, and followed the followers.
        let served = "imgcache_peer_events_total{event=\"served\"} ";
        let by_leader = leader.metric(&client, served).await;
        let mut busy = 0.0;
        let mut by_followers = 0.0;
        for n in &followers {
            busy += n
                .metric(&client, "imgcache_peer_events_total{event=\"busy\"} ")
                .await;
            by_followers += n.metric(&client, served).await;
        }
        assert!(
            by_leader + by_followers >= 4.0,
            "{by_leader} + {by_followers}"
        );
        assert!(
            by_leader < 4.0,
            "a star, not a tree: the leader served every peer"
        );
        assert!(busy >= 1.0, "no node was told a peer was busy");
    });
}

#[test]
fn a_pass_through_takes_no_part_in_the_fleets_fills() {
    let Some(db) = database() else { return };
    let id = unique("bypass");
    let image = data(1 << 20, 6);
    runtime().block_on(async {
        let origin = Origin::start(HashMap::from([(id.clone(), image.clone())]), 256 << 20).await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "fleet-secret");
        // No room for the image: its clients get the origin's bytes,
        // uncached, on the node's own connections to the origin.
        let mut tight =
            Node::start_args(&db, &origin, Some(&token), 4, &["--hard-limit", "64KiB"]).await;
        let client = reqwest::Client::new();
        for round in 1..=2 {
            let r = client.get(tight.image(&id)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-imgcache"], "bypass");
            assert!(r.bytes().await.unwrap()[..] == image[..]);
            assert!(tight.child.try_wait().unwrap().is_none(), "the node died");
            assert_eq!(origin.gets(), 2 * round, "a fill and its pass-through");
        }
        // No claim or announcement was left behind: another node fills
        // at once, from the origin.
        let other = Node::start(&db, &origin, &token, 4).await;
        assert!(stampede(&client, &[&other], &id, 1).await[0][..] == image[..]);
        assert_eq!(origin.gets(), 5);
    });
}
