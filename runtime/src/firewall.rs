//! The firewall of berth's containers, in nftables: one table per server's bridge (`inet
//! berth-<bridge>`), so two servers with different bridges and subnets never touch each
//! other's rules, and nothing else on the host is touched. Containers are routed (see
//! [`crate::network`]), so the rules tell them by their subnet. Containers (apps and builds)
//! reach the outside by masquerade; they cannot open connections to the host itself (berth's
//! SSH and admin ports, anything listening on 0.0.0.0 answers on the gateway address) but for
//! DNS (port 53, UDP and TCP) on the gateway address, where berth's DNS stub answers, nor send
//! to 127.0.0.0/8, nor reach one another, while replies to connections the host opened into
//! them (the proxy, health checks) pass. Containers whose address is in the table's set
//! `no-egress` ([`set_no_egress`]) open no connection out of the bridge at all, nor ask the DNS
//! stub (which would carry their queries out): it is rejected (TCP by a reset, the rest by an
//! ICMP error), so a connect or a DNS query fails at once instead of hanging.
//!
//! Driven through the `nft` binary (Debian's `nftables` package) with typed JSON from the
//! `nftables` crate. [`ensure`] replaces the table atomically in one transaction, so it is
//! idempotent; [`remove`] deletes it. Also owns turning IPv4 forwarding on, which NAT needs.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Rule, Set, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::Error;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The set of container addresses that may not leave the bridge.
const NO_EGRESS: &str = "no-egress";
/// The port of berth's DNS stub on the gateway address, the one port of the host containers
/// reach.
const DNS_PORT: u16 = 53;

/// The name of the table holding `bridge`'s rules.
pub fn table_name(bridge: &str) -> String {
    format!("berth-{bridge}")
}

/// Turns IPv4 forwarding on and (re)installs the rules of `bridge`, whose subnet is
/// `gateway/prefix_len`. Forwarding is left on at shutdown: other things may rely on it.
pub fn ensure(bridge: &str, gateway: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
    std::fs::write(IP_FORWARD, "1").map_err(Error::io(format!(
        "turning IPv4 forwarding on ({IP_FORWARD}), which containers need to reach the outside"
    )))?;
    let table = table(bridge);
    let mut batch = Batch::new();
    // Add, delete, add: the table is replaced whether or not it was there, in one transaction.
    batch.add(NfListObject::Table(table.clone()));
    batch.delete(NfListObject::Table(table.clone()));
    batch.add(NfListObject::Table(table));
    batch.add(NfListObject::Set(Box::new(no_egress_set(bridge))));
    for (name, kind, hook, prio) in [
        ("prerouting", NfChainType::Filter, NfHook::Prerouting, 0),
        ("input", NfChainType::Filter, NfHook::Input, 0),
        ("forward", NfChainType::Filter, NfHook::Forward, 0),
        ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
    ] {
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: table_name(bridge).into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }
    for (chain, statements) in rules(gateway, prefix_len) {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: table_name(bridge).into(),
            chain: chain.into(),
            expr: statements.into(),
            ..Rule::default()
        }));
    }
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(firewall_error(format!(
        "installing the firewall table inet {}",
        table_name(bridge)
    )))
}

/// Makes `addresses` the whole of `bridge`'s set of containers that may not open connections
/// out of the bridge (in one transaction; the table must exist, see [`ensure`]).
pub fn set_no_egress(bridge: &str, addresses: &[Ipv4Addr]) -> Result<(), Error> {
    let mut batch = Batch::new();
    batch.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(no_egress_set(
        bridge,
    )))));
    if !addresses.is_empty() {
        batch.add(NfListObject::Element(Element {
            family: NfFamily::INet,
            table: table_name(bridge).into(),
            name: NO_EGRESS.into(),
            elem: addresses
                .iter()
                .map(|ip| Expression::String(ip.to_string().into()))
                .collect(),
        }));
    }
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(firewall_error(format!(
        "setting the addresses without egress in inet {}",
        table_name(bridge)
    )))
}

/// Deletes the rules of `bridge`; succeeds if there are none.
pub fn remove(bridge: &str) -> Result<(), Error> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table(bridge)));
    batch.delete(NfListObject::Table(table(bridge)));
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(firewall_error(format!(
        "deleting the firewall table inet {}",
        table_name(bridge)
    )))
}

fn no_egress_set(bridge: &str) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: table_name(bridge).into(),
        name: NO_EGRESS.into(),
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        ..Set::default()
    }
}

fn table(bridge: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: table_name(bridge).into(),
        handle: None,
    }
}

/// The rules, chain by chain, in order.
fn rules(gateway: Ipv4Addr, prefix_len: u8) -> Vec<(&'static str, Vec<Statement<'static>>)> {
    let subnet = Ipv4Addr::from(u32::from(gateway) & (u32::MAX << (32 - prefix_len)));
    // Containers are routed (see `network`): what comes from one has its address as source and
    // does not come from the host itself (whose own packets to the gateway address come in
    // on `lo`, from the gateway address).
    let from_containers = || {
        vec![
            meta(MetaKey::Iifname, Operator::NEQ, "lo"),
            ip_in("saddr", subnet, prefix_len, Operator::EQ),
        ]
    };
    let not_from_containers = || vec![ip_in("saddr", subnet, prefix_len, Operator::NEQ)];
    let to_containers = || vec![ip_in("daddr", subnet, prefix_len, Operator::EQ)];
    let not_to_containers = || vec![ip_in("daddr", subnet, prefix_len, Operator::NEQ)];
    let without_egress = || {
        matching(
            ip_field("saddr"),
            Expression::String(format!("@{NO_EGRESS}").into()),
            Operator::EQ,
        )
    };
    let accept = || Statement::Accept(None);
    let drop = || Statement::Drop(None);
    let l4proto = || {
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        }))
    };
    let tcp = || matching(l4proto(), Expression::String("tcp".into()), Operator::EQ);
    // Without egress: TCP by a reset, the rest by an ICMP error.
    let reset = || Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None)));
    let prohibited = || {
        Statement::Reject(Some(Reject::new(
            Some(RejectType::ICMPX),
            Some(RejectCode::AdminProhibited),
        )))
    };
    // `iifname BRIDGE ip daddr GATEWAY meta l4proto { tcp, udp } th dport 53 THEN…`: a query
    // to berth's DNS stub.
    let to_dns = |then: Vec<Statement<'static>>| {
        [
            from_containers(),
            vec![
                matching(
                    ip_field("daddr"),
                    Expression::String(gateway.to_string().into()),
                    Operator::EQ,
                ),
                matching(
                    l4proto(),
                    Expression::Named(NamedExpression::Set(vec![
                        SetItem::Element(Expression::String("tcp".into())),
                        SetItem::Element(Expression::String("udp".into())),
                    ])),
                    Operator::EQ,
                ),
                matching(
                    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                        PayloadField {
                            protocol: "th".into(),
                            field: "dport".into(),
                        },
                    ))),
                    Expression::Number(DNS_PORT.into()),
                    Operator::EQ,
                ),
            ],
            then,
        ]
        .concat()
    };
    vec![
        // Loopback addresses never come from a container (the kernel drops them too, as long as
        // route_localnet is off; this holds even if someone turns it on).
        (
            "prerouting",
            [
                from_containers(),
                vec![
                    ip_in("daddr", Ipv4Addr::new(127, 0, 0, 0), 8, Operator::EQ),
                    drop(),
                ],
            ]
            .concat(),
        ),
        // To the host itself: only replies to what the host opened (proxy, health checks), and
        // DNS queries to the stub from containers with egress.
        (
            "input",
            [from_containers(), vec![established(), accept()]].concat(),
        ),
        ("input", to_dns(vec![without_egress(), tcp(), reset()])),
        ("input", to_dns(vec![without_egress(), prohibited()])),
        ("input", to_dns(vec![accept()])),
        ("input", [from_containers(), vec![drop()]].concat()),
        // Out to elsewhere: nothing from containers without egress (rejected, so a connect or a
        // DNS query fails at once: TCP by a reset, the rest by an ICMP error), anything from
        // the others; from one container to another: nothing; into containers from elsewhere:
        // only replies.
        (
            "forward",
            [
                from_containers(),
                not_to_containers(),
                vec![without_egress(), tcp(), reset()],
            ]
            .concat(),
        ),
        (
            "forward",
            [
                from_containers(),
                not_to_containers(),
                vec![without_egress(), prohibited()],
            ]
            .concat(),
        ),
        (
            "forward",
            [from_containers(), not_to_containers(), vec![accept()]].concat(),
        ),
        ("forward", [from_containers(), vec![drop()]].concat()),
        (
            "forward",
            [
                to_containers(),
                not_from_containers(),
                vec![established(), accept()],
            ]
            .concat(),
        ),
        ("forward", [to_containers(), vec![drop()]].concat()),
        (
            "postrouting",
            [
                vec![ip_in("saddr", subnet, prefix_len, Operator::EQ)],
                not_to_containers(),
                vec![Statement::Masquerade(None)],
            ]
            .concat(),
        ),
    ]
}

/// `meta KEY OP value`.
fn meta(key: MetaKey, op: Operator, value: &str) -> Statement<'static> {
    matching(
        Expression::Named(NamedExpression::Meta(Meta { key })),
        Expression::String(Cow::Owned(value.to_string())),
        op,
    )
}

/// `ip FIELD`.
fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "ip".into(),
            field: field.into(),
        },
    )))
}

/// `ip FIELD OP addr/len`.
fn ip_in(field: &'static str, addr: Ipv4Addr, len: u8, op: Operator) -> Statement<'static> {
    matching(
        ip_field(field),
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(addr.to_string().into())),
            len: len.into(),
        })),
        op,
    )
}

/// `ct state established,related`.
fn established() -> Statement<'static> {
    matching(
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Expression::List(vec![
            Expression::String("established".into()),
            Expression::String("related".into()),
        ]),
        Operator::IN,
    )
}

fn matching(
    left: Expression<'static>,
    right: Expression<'static>,
    op: Operator,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn firewall_error(context: String) -> impl FnOnce(nftables::helper::NftablesError) -> Error {
    move |source| Error::Firewall { context, source }
}
