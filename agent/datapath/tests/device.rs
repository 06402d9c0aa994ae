//! Two (or three) `Device`s talking through byte buffers.

mod common;

use std::time::Duration;

use common::*;
use sdn_tunnel_datapath::{
    DeviceConfig, DeviceError, DropReason, PeerChange, PeerConfig, PrivateKey,
};

#[test]
fn handshake_then_data_both_ways_v4_and_v6() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);

    // B answers over the established session: a data message, no handshake.
    let reply = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"world");
    match lab.tun_read(1, &reply) {
        Got::Sent(to, d) => {
            assert_eq!(to, lab.nodes[0].addr);
            assert_eq!(msg_type(&d), 4);
            assert_eq!(d.len(), reply.len() + 16 + 16);
        }
        other => panic!("expected data, got {other:?}"),
    }
    lab.run();
    assert_eq!(lab.nodes[0].tun, vec![reply]);

    let p6 = ipv6_packet(v6("fd01::5"), v6("fd02::7"), &[0xab; 300]);
    lab.send(0, &p6);
    assert_eq!(lab.nodes[1].tun, vec![p6.clone()]);
    let r6 = ipv6_packet(v6("fd02::7"), v6("fd01::5"), &[0xcd; 1200]);
    lab.send(1, &r6);
    assert_eq!(lab.nodes[0].tun.last(), Some(&r6));

    for n in &lab.nodes {
        assert_eq!(n.dev.drops().total(), 0, "{:?}", n.dev.drops());
        assert!(n.drops.is_empty());
    }
    let a_sees_b = lab.nodes[0].dev.peer_stats(&lab.nodes[1].public()).unwrap();
    let b_sees_a = lab.nodes[1].dev.peer_stats(&lab.nodes[0].public()).unwrap();
    assert!(a_sees_b.last_handshake_age.is_some());
    assert!(b_sees_a.last_handshake_age.is_some());
    // Every datagram one side sent, the other received and authenticated.
    assert_eq!(a_sees_b.tx_packets, b_sees_a.rx_packets);
    assert_eq!(a_sees_b.tx_bytes, b_sees_a.rx_bytes);
    assert_eq!(b_sees_a.tx_packets, a_sees_b.rx_packets);
    assert_eq!(b_sees_a.tx_bytes, a_sees_b.rx_bytes);
    // init + keepalive + 2 data from A; response + 2 data from B.
    assert_eq!(a_sees_b.tx_packets, 4);
    assert_eq!(b_sees_a.tx_packets, 3);
    assert_eq!(a_sees_b.endpoint, Some(lab.nodes[1].addr));
    assert_eq!(a_sees_b.allowed_ips, nets(&["10.2.0.0/16", "fd02::/64"]));
    // The device-wide snapshot holds the same peer (ages move with time).
    let all = lab.nodes[0].dev.stats();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].public_key, a_sees_b.public_key);
    assert_eq!(all[0].tx_bytes, a_sees_b.tx_bytes);
}

#[test]
fn disallowed_source_is_dropped_after_decryption() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    // B's device routes by destination, so it encrypts a packet whose
    // source A never allowed for B.
    let spoofed = ipv4_packet(v4("10.9.0.1"), v4("10.1.0.5"), b"spoof");
    assert!(matches!(lab.tun_read(1, &spoofed), Got::Sent(..)));
    lab.run();
    assert!(lab.nodes[0].tun.is_empty());
    assert_eq!(lab.nodes[0].drops, vec![DropReason::DisallowedSource]);
    assert_eq!(
        lab.nodes[0].dev.drops().get(DropReason::DisallowedSource),
        1
    );
    // A source inside B's allowed IPs still passes.
    let ok = ipv4_packet(v4("10.2.200.1"), v4("10.1.0.5"), b"fine");
    lab.send(1, &ok);
    assert_eq!(lab.nodes[0].tun, vec![ok]);
}

#[test]
fn garbage_and_tampering_are_counted_without_hurting_the_session() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let b_addr = lab.nodes[1].addr;

    // Random junk and a truncated data header.
    assert_eq!(
        lab.inject(0, b_addr, b"\x07garbage that is not wireguard"),
        Got::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        lab.inject(0, b_addr, &[4, 0, 0, 0, 1, 2, 3]),
        Got::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        lab.inject(0, b_addr, &[]),
        Got::Dropped(DropReason::Malformed)
    );

    // A real data message, tampered, replayed, and with a foreign index.
    let p = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"payload");
    let Got::Sent(_, good) = lab.tun_read(1, &p) else {
        panic!("B should send data")
    };
    lab.wire.clear();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(
        lab.inject(0, b_addr, &bad),
        Got::Dropped(DropReason::DecryptFailed)
    );
    assert_eq!(lab.inject(0, b_addr, &good), Got::Tun(p.clone()));
    assert_eq!(
        lab.inject(0, b_addr, &good),
        Got::Dropped(DropReason::Replay)
    );
    let mut foreign = good.clone();
    foreign[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    assert_eq!(
        lab.inject(0, b_addr, &foreign),
        Got::Dropped(DropReason::UnknownPeer)
    );

    let drops = lab.nodes[0].dev.drops();
    assert_eq!(drops.get(DropReason::Malformed), 3);
    assert_eq!(drops.get(DropReason::DecryptFailed), 1);
    assert_eq!(drops.get(DropReason::Replay), 1);
    assert_eq!(drops.get(DropReason::UnknownPeer), 1);
    assert_eq!(drops.total(), 6);

    // The session is intact both ways, without a new handshake.
    let q = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"still here");
    let Got::Sent(_, d) = lab.send(0, &q) else {
        panic!()
    };
    assert_eq!(msg_type(&d), 4);
    assert_eq!(lab.nodes[1].tun, vec![q]);
    // Unauthenticated junk did not move B's endpoint at A.
    let st = lab.nodes[0].dev.peer_stats(&lab.nodes[1].public()).unwrap();
    assert_eq!(st.endpoint, Some(b_addr));
}

#[test]
fn forged_source_address_does_not_move_the_endpoint() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let p = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"x");
    let Got::Sent(_, good) = lab.tun_read(1, &p) else {
        panic!()
    };
    lab.wire.clear();
    let mut bad = good.clone();
    bad[20] ^= 0xff;
    let attacker = "198.51.100.66:4444".parse().unwrap();
    assert_eq!(
        lab.inject(0, attacker, &bad),
        Got::Dropped(DropReason::DecryptFailed)
    );
    let st = lab.nodes[0].dev.peer_stats(&lab.nodes[1].public()).unwrap();
    assert_eq!(st.endpoint, Some(lab.nodes[1].addr));
}

#[test]
fn roaming_updates_the_endpoint() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let new_addr = "203.0.113.9:40000".parse().unwrap();
    lab.nodes[1].addr = new_addr;
    let p = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"from a new place");
    lab.send(1, &p);
    assert_eq!(lab.nodes[0].tun, vec![p]);
    let st = lab.nodes[0].dev.peer_stats(&lab.nodes[1].public()).unwrap();
    assert_eq!(st.endpoint, Some(new_addr));
    // A now answers to the new address.
    let q = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"reply");
    assert!(matches!(lab.tun_read(0, &q), Got::Sent(to, _) if to == new_addr));
    lab.run();
    assert_eq!(lab.nodes[1].tun, vec![q]);
}

#[test]
fn endpoint_is_learned_from_the_initiator() {
    // A knows no endpoint for B; B knows A's. A cannot send first...
    let mut a = Node::new("192.0.2.1:51820");
    let mut b = Node::new("192.0.2.2:51820");
    let mut cfg = peer_cfg(&b, &["10.2.0.0/16"], None);
    cfg.endpoint = None;
    a.dev.set_peer(cfg).unwrap();
    b.dev
        .set_peer(peer_cfg(&a, &["10.1.0.0/16"], None))
        .unwrap();
    let mut lab = Lab::new(vec![a, b]);
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    assert_eq!(lab.tun_read(0, &p), Got::Dropped(DropReason::NoEndpoint));
    // ...but once B initiates, A knows where B is and can answer.
    let q = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"hi");
    lab.send(1, &q);
    assert_eq!(lab.nodes[0].tun, vec![q]);
    lab.send(0, &p);
    assert_eq!(lab.nodes[1].tun, vec![p]);
}

#[test]
fn removed_peer_stops_traffic() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let b_key = lab.nodes[1].public();
    assert!(lab.nodes[0].dev.remove_peer(&b_key));
    assert!(!lab.nodes[0].dev.remove_peer(&b_key));
    assert_eq!(lab.nodes[0].dev.peer_count(), 0);
    assert!(lab.nodes[0].dev.peer_stats(&b_key).is_none());

    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    assert_eq!(lab.tun_read(0, &p), Got::Dropped(DropReason::NoRoute));
    let q = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"y");
    assert!(matches!(lab.tun_read(1, &q), Got::Sent(..)));
    lab.run();
    assert!(lab.nodes[0].tun.is_empty());
    assert_eq!(lab.nodes[0].drops, vec![DropReason::UnknownPeer]);
}

#[test]
fn persistent_keepalive_is_sent_after_idle() {
    let mut lab = Lab::pair(Some(1));
    establish(&mut lab);
    // Run B's timers so it has seen the session before idling.
    lab.timers(1);
    lab.run();
    let before = lab.nodes[1]
        .dev
        .peer_stats(&lab.nodes[0].public())
        .unwrap()
        .rx_packets;
    std::thread::sleep(Duration::from_millis(1100));
    let sent = lab.timers(0);
    assert_eq!(sent.len(), 1, "one keepalive from A: {sent:?}");
    let (to, d) = &sent[0];
    assert_eq!(*to, lab.nodes[1].addr);
    assert_eq!(msg_type(d), 4);
    assert_eq!(d.len(), 32, "a keepalive is an empty data message");
    lab.run();
    let after = lab.nodes[1]
        .dev
        .peer_stats(&lab.nodes[0].public())
        .unwrap()
        .rx_packets;
    assert_eq!(after, before + 1);
    assert!(
        lab.nodes[1].tun.is_empty(),
        "keepalives never reach the TUN"
    );
    assert_eq!(lab.nodes[1].dev.drops().total(), 0);
}

#[test]
fn the_receive_clock_follows_authenticated_traffic_at_timer_ticks() {
    let mut lab = Lab::pair(Some(1));
    let b_of_a = |lab: &Lab| lab.nodes[1].dev.peer_stats(&lab.nodes[0].public()).unwrap();
    assert_eq!(b_of_a(&lab).last_receive_age, None, "nothing received yet");
    establish(&mut lab);
    // Traffic arrived, but the clock moves at timer ticks only.
    assert_eq!(b_of_a(&lab).last_receive_age, None);
    lab.timers(1);
    let fresh = b_of_a(&lab).last_receive_age.expect("seen at the tick");
    assert!(fresh < Duration::from_millis(500), "{fresh:?}");
    // Silence: the age grows, ticks or not.
    std::thread::sleep(Duration::from_millis(300));
    lab.timers(1);
    let silent = b_of_a(&lab).last_receive_age.unwrap();
    assert!(silent >= Duration::from_millis(300), "{silent:?}");
    // Garbage from A's address is not "received from A".
    let from_a = lab.nodes[0].addr;
    let _ = lab.nodes[1]
        .dev
        .decapsulate(from_a, &[4u8; 64], &mut [0u8; 256]);
    lab.timers(1);
    assert!(b_of_a(&lab).last_receive_age.unwrap() >= Duration::from_millis(300));
    // A keepalive from A resets it.
    std::thread::sleep(Duration::from_millis(1000));
    lab.timers(0);
    lab.run();
    lab.timers(1);
    let after = b_of_a(&lab).last_receive_age.unwrap();
    assert!(after < Duration::from_millis(300), "{after:?}");
}

#[test]
fn keepalive_is_not_sent_when_disabled() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(lab.timers(0).is_empty());
}

#[test]
fn updating_one_peer_keeps_the_other_sessions() {
    let mut lab = Lab::pair(None);
    let c = Node::new("192.0.2.3:51820");
    lab.nodes[0]
        .dev
        .set_peer(peer_cfg(&c, &["10.3.0.0/16"], None))
        .unwrap();
    establish(&mut lab);
    let b_key = lab.nodes[1].public();

    // Change C: new endpoint, take over a /24 inside B's range.
    let mut c_cfg = peer_cfg(&c, &["10.3.0.0/16", "10.2.9.0/24"], None);
    c_cfg.endpoint = Some("192.0.2.33:51820".parse().unwrap());
    assert_eq!(lab.nodes[0].dev.set_peer(c_cfg), Ok(PeerChange::Updated));
    // Re-apply B's config with the same key material: session kept.
    let b_cfg = peer_cfg(&lab.nodes[1], &["10.2.0.0/16", "fd02::/64"], None);
    assert_eq!(
        lab.nodes[0].dev.set_peer(b_cfg.clone()),
        Ok(PeerChange::Updated)
    );
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    let Got::Sent(to, d) = lab.send(0, &p) else {
        panic!()
    };
    assert_eq!(to, lab.nodes[1].addr);
    assert_eq!(msg_type(&d), 4, "no new handshake for B");
    assert_eq!(lab.nodes[1].tun, vec![p]);
    // The /24 now routes to C.
    let to_c = ipv4_packet(v4("10.1.0.5"), v4("10.2.9.1"), b"c");
    assert!(
        matches!(lab.tun_read(0, &to_c), Got::Sent(to, _) if to == "192.0.2.33:51820".parse().unwrap())
    );

    // Moving B's /16 to C entirely (WireGuard semantics: last one wins).
    let c_cfg = peer_cfg(&c, &["10.2.0.0/16"], None);
    lab.nodes[0].dev.set_peer(c_cfg).unwrap();
    let b_stats = lab.nodes[0].dev.peer_stats(&b_key).unwrap();
    assert_eq!(b_stats.allowed_ips, nets(&["fd02::/64"]));
    let c_stats = lab.nodes[0].dev.peer_stats(&c.public()).unwrap();
    assert_eq!(c_stats.allowed_ips, nets(&["10.2.0.0/16"]));

    // Changing B's keepalive recreates only B's session.
    let mut b_cfg = b_cfg;
    b_cfg.persistent_keepalive = Some(5);
    assert_eq!(lab.nodes[0].dev.set_peer(b_cfg), Ok(PeerChange::Recreated));
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"y");
    let Got::Sent(_, d) = lab.tun_read(0, &p) else {
        panic!()
    };
    assert_eq!(msg_type(&d), 1, "B's session was reset: new handshake");
    lab.run();
    assert_eq!(lab.nodes[1].tun.last(), Some(&p));
}

#[test]
fn own_key_is_rejected() {
    let lab = Lab::pair(None);
    let mut dev = lab.nodes.into_iter().next().unwrap();
    let own = dev.public();
    assert_eq!(
        dev.dev.set_peer(PeerConfig::new(own)),
        Err(DeviceError::OwnKey(own))
    );
}

#[test]
fn handshake_from_unknown_key_or_for_another_key_is_dropped() {
    let mut lab = Lab::pair(None);
    // E knows A, but A does not know E.
    let mut e = Node::new("192.0.2.5:51820");
    e.dev
        .set_peer(peer_cfg(&lab.nodes[0], &["10.1.0.0/16"], None))
        .unwrap();
    // F thinks A's address belongs to some other key.
    let mut f = Node::new("192.0.2.6:51820");
    let mut other = peer_cfg(&lab.nodes[0], &["10.1.0.0/16"], None);
    other.public_key = PrivateKey::generate().public_key();
    f.dev.set_peer(other).unwrap();
    lab.nodes.push(e);
    lab.nodes.push(f);
    let p = ipv4_packet(v4("10.5.0.1"), v4("10.1.0.5"), b"x");
    lab.send(2, &p);
    lab.send(3, &p);
    assert_eq!(
        lab.nodes[0].drops,
        vec![DropReason::UnknownPeer, DropReason::InvalidMac]
    );
    assert!(lab.nodes[0].tun.is_empty());
}

#[test]
fn cookie_reply_under_load_then_handshake_with_mac2() {
    // A verifies at most one handshake message before asking for cookies.
    let mut a = Node::with_config("192.0.2.1:51820", |c| DeviceConfig {
        handshake_rate_limit: 1,
        ..c
    });
    let mut b = Node::new("192.0.2.2:51820");
    a.dev
        .set_peer(peer_cfg(&b, &["10.2.0.0/16"], None))
        .unwrap();
    b.dev
        .set_peer(peer_cfg(&a, &["10.1.0.0/16"], None))
        .unwrap();
    let mut lab = Lab::new(vec![a, b]);
    let b_addr = lab.nodes[1].addr;

    let p = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"x");
    let Got::Sent(_, init) = lab.tun_read(1, &p) else {
        panic!()
    };
    lab.wire.clear();
    // First initiation is within the limit and answered (we lose the
    // answer on the way back).
    assert!(matches!(lab.inject(0, b_addr, &init), Got::Sent(_, r) if msg_type(&r) == 2));
    lab.wire.clear();
    // The next one gets a cookie reply instead of being processed.
    let Got::Sent(to, cookie) = lab.inject(0, b_addr, &init) else {
        panic!("expected a cookie reply")
    };
    assert_eq!(to, b_addr);
    assert_eq!(msg_type(&cookie), 3);
    assert_eq!(cookie.len(), 64);
    assert_eq!(lab.nodes[0].dev.drops().get(DropReason::UnderLoad), 1);
    lab.wire.clear();
    // B accepts the cookie.
    assert_eq!(lab.inject(1, lab.nodes[0].addr, &cookie), Got::Done);
    assert_eq!(lab.nodes[1].dev.drops().total(), 0);
    // B retries after REKEY_TIMEOUT (5 s); the retry carries a valid MAC2,
    // so A, still under load, processes it.
    std::thread::sleep(Duration::from_millis(5100));
    let sent = lab.timers(1);
    assert_eq!(sent.len(), 1);
    assert_eq!(msg_type(&sent[0].1), 1);
    lab.run();
    assert_eq!(lab.nodes[0].dev.drops().get(DropReason::UnderLoad), 1);
    assert_eq!(lab.nodes[0].tun, vec![p]);
}

#[test]
fn handshake_can_be_initiated_before_traffic() {
    let mut lab = Lab::pair(None);
    let b_key = lab.nodes[1].public();
    let unknown = PrivateKey::generate().public_key();
    let mut out = [0u8; BUF];
    assert_eq!(
        Got::from(lab.nodes[0].dev.initiate_handshake(&unknown, &mut out)),
        Got::Done
    );
    let Got::Sent(to, init) = Got::from(lab.nodes[0].dev.initiate_handshake(&b_key, &mut out))
    else {
        panic!("expected an initiation")
    };
    assert_eq!(to, lab.nodes[1].addr);
    assert_eq!(msg_type(&init), 1);
    assert_eq!(lab.nodes[0].dev.handshake_initiations(), 1, "counted");
    // A second call while the first is in flight sends nothing.
    assert_eq!(
        Got::from(lab.nodes[0].dev.initiate_handshake(&b_key, &mut out)),
        Got::Done
    );
    assert_eq!(lab.nodes[0].dev.handshake_initiations(), 1);
    lab.wire.push_back((0, to, init));
    lab.run();
    let st = lab.nodes[0].dev.peer_stats(&b_key).unwrap();
    assert!(st.last_handshake_age.is_some(), "session is up: {st:?}");
    // Data flows at once, without another handshake.
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    let Got::Sent(_, d) = lab.send(0, &p) else {
        panic!()
    };
    assert_eq!(msg_type(&d), 4);
    assert_eq!(lab.nodes[1].tun, vec![p]);
}

#[test]
fn device_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<sdn_tunnel_datapath::Device>();
}

#[test]
fn peer_config_round_trips_through_set_peer() {
    let mut lab = Lab::pair(Some(7));
    establish(&mut lab);
    let b_key = lab.nodes[1].public();
    let mut cfg = lab.nodes[0].dev.peer_config(&b_key).unwrap();
    assert_eq!(cfg.public_key, b_key);
    assert_eq!(cfg.endpoint, Some(lab.nodes[1].addr));
    assert_eq!(cfg.allowed_ips, nets(&["10.2.0.0/16", "fd02::/64"]));
    assert_eq!(cfg.persistent_keepalive, Some(7));
    assert_eq!(cfg.preshared_key, None);
    assert_eq!(
        lab.nodes[0].dev.set_peer(cfg.clone()),
        Ok(PeerChange::Updated)
    );
    // The UAPI pattern: read, add one prefix, write back.
    cfg.allowed_ips.push("10.20.0.0/16".parse().unwrap());
    lab.nodes[0].dev.set_peer(cfg.clone()).unwrap();
    let again = lab.nodes[0].dev.peer_config(&b_key).unwrap();
    assert_eq!(
        again.allowed_ips,
        nets(&["10.2.0.0/16", "10.20.0.0/16", "fd02::/64"])
    );
    let stats = lab.nodes[0].dev.peer_stats(&b_key).unwrap();
    assert!(stats.handshake_rtt.is_some(), "A initiated: rtt known");
    assert!(lab.nodes[0]
        .dev
        .peer_config(&PrivateKey::generate().public_key())
        .is_none());
}

#[test]
fn preshared_key_must_match_on_both_sides() {
    let mut lab = Lab::pair(None);
    let psk = [9u8; 32];
    for (i, j) in [(0, 1), (1, 0)] {
        let other = lab.nodes[j].public();
        let mut cfg = lab.nodes[i].dev.peer_config(&other).unwrap();
        cfg.preshared_key = Some(psk);
        assert_eq!(lab.nodes[i].dev.set_peer(cfg), Ok(PeerChange::Recreated));
    }
    establish(&mut lab);
    // A PSK mismatch: A changes its PSK, so its next handshake fails at B.
    let b_key = lab.nodes[1].public();
    let mut cfg = lab.nodes[0].dev.peer_config(&b_key).unwrap();
    cfg.preshared_key = Some([8u8; 32]);
    lab.nodes[0].dev.set_peer(cfg).unwrap();
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    lab.send(0, &p);
    assert!(lab.nodes[1].tun.is_empty());
    // B answers the initiation (it cannot see the PSK yet); A cannot
    // decrypt the response.
    assert_eq!(lab.nodes[0].drops, vec![DropReason::DecryptFailed]);
}

#[test]
fn changing_the_private_key_resets_sessions_and_identity() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let new_key = PrivateKey::generate();
    let b_key = lab.nodes[1].public();
    let old_a = lab.nodes[0].public();
    assert!(!lab.nodes[0].dev.set_private_key(&new_key));
    assert_eq!(lab.nodes[0].dev.public_key(), new_key.public_key());
    lab.nodes[0].key = new_key.clone();
    // Peer kept, session gone.
    let st = lab.nodes[0].dev.peer_stats(&b_key).unwrap();
    assert_eq!(st.last_handshake_age, None);
    // B still expects the old key: A's new initiations are refused.
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"x");
    lab.send(0, &p);
    assert!(lab.nodes[1].tun.is_empty());
    assert_eq!(lab.nodes[1].drops, vec![DropReason::UnknownPeer]);
    // Once B learns A's new key, they talk again.
    assert!(lab.nodes[1].dev.remove_peer(&old_a));
    let cfg = peer_cfg(&lab.nodes[0], &["10.1.0.0/16"], None);
    lab.nodes[1].dev.set_peer(cfg).unwrap();
    let q = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), b"y");
    lab.send(1, &q);
    assert_eq!(lab.nodes[0].tun, vec![q]);
    // Taking a peer's key as our own removes that peer.
    let b_private = lab.nodes[1].key.clone();
    assert!(lab.nodes[0].dev.set_private_key(&b_private));
    assert_eq!(lab.nodes[0].dev.peer_count(), 0);
}
