//! One DNS query: answered here (a mesh service's name), or for the pod's
//! own resolver.

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};

use super::names::ServiceNames;

/// How long clients may keep an answer for a service name. Short: the
/// services change with the configuration.
pub const TTL_SECS: u32 = 30;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The answer, ready to send.
    Answer(Vec<u8>),
    /// Not a mesh service's name (or not a query the agent answers): the
    /// pod's resolver answers it, bytes as they came.
    Forward,
    /// Not a DNS message at all: dropped (a resolver ignores such datagrams).
    Drop,
}

/// Decides `query` against the service names in force.
pub fn decide(query: &[u8], names: &ServiceNames) -> Decision {
    let Ok(request) = Message::from_vec(query) else {
        return Decision::Drop;
    };
    if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
        || request.queries.len() != 1
    {
        return Decision::Forward;
    }
    let question = &request.queries[0];
    if question.query_class() != DNSClass::IN {
        return Decision::Forward;
    }
    let Some(vips) = names.lookup(question.name()) else {
        return Decision::Forward;
    };
    let records: Vec<Record> = vips
        .iter()
        .filter_map(|vip| {
            let data = match (question.query_type(), vip) {
                (RecordType::A, std::net::IpAddr::V4(v4)) => RData::A(rdata::A(*v4)),
                (RecordType::AAAA, std::net::IpAddr::V6(v6)) => RData::AAAA(rdata::AAAA(*v6)),
                _ => return None,
            };
            Some(Record::from_rdata(question.name().clone(), TTL_SECS, data))
        })
        .collect();
    // A service's name with no address of the kind asked (or another record
    // type): an empty answer (NODATA), not an error: the name exists.
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = ResponseCode::NoError;
    response.add_query(question.clone());
    response.add_answers(records);
    if let Some(edns) = &request.edns {
        let mut reply = Edns::new();
        reply.set_max_payload(edns.max_payload().max(512));
        response.set_edns(reply);
    }
    match response.to_vec() {
        Ok(bytes) => Decision::Answer(bytes),
        Err(_) => Decision::Forward,
    }
}

/// The name a query asks about, for logs.
pub fn question_name(query: &[u8]) -> Option<Name> {
    Message::from_vec(query)
        .ok()?
        .queries
        .first()
        .map(|q| q.name().clone())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hickory_proto::op::Query;

    use super::*;
    use crate::config::ServiceConfig;

    fn names() -> ServiceNames {
        let service: ServiceConfig = serde_yaml::from_str(
            "name: web\nnamespace: shop\nvips: [10.96.0.10, \"fd00:96::10\"]\nports: [{port: 80}]\nendpoints: []\n",
        )
        .unwrap();
        let v4_only: ServiceConfig = serde_yaml::from_str(
            "name: db\nnamespace: shop\nvips: [10.96.0.11]\nports: [{port: 80}]\nendpoints: []\n",
        )
        .unwrap();
        ServiceNames::new("cluster.local", &[service, v4_only])
    }

    fn query(name: &str, kind: RecordType, edns: bool) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        if edns {
            message.set_edns(Edns::new());
        }
        message.to_vec().unwrap()
    }

    fn answered(bytes: &[u8]) -> Message {
        match decide(bytes, &names()) {
            Decision::Answer(answer) => Message::from_vec(&answer).unwrap(),
            other => panic!("not answered: {other:?}"),
        }
    }

    fn addresses(message: &Message) -> Vec<IpAddr> {
        message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_service_name_is_answered_with_its_vips_of_the_family_asked() {
        let a = answered(&query("web.shop.svc.cluster.local.", RecordType::A, false));
        assert_eq!(a.metadata.id, 4242);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative && a.metadata.recursion_desired);
        assert_eq!(a.queries.len(), 1, "the question is echoed");
        assert_eq!(addresses(&a), ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.answers[0].ttl, TTL_SECS);
        assert!(a.edns.is_none(), "no OPT without one in the query");

        let aaaa = answered(&query(
            "web.shop.svc.cluster.local.",
            RecordType::AAAA,
            true,
        ));
        assert_eq!(addresses(&aaaa), ["fd00:96::10".parse::<IpAddr>().unwrap()]);
        assert!(aaaa.edns.is_some(), "an OPT answers an OPT");

        // The name exists without an IPv6 VIP: NODATA, not NXDOMAIN.
        let none = answered(&query(
            "db.shop.svc.cluster.local.",
            RecordType::AAAA,
            false,
        ));
        assert_eq!(none.metadata.response_code, ResponseCode::NoError);
        assert!(none.answers.is_empty());
        let mx = answered(&query("db.shop.svc.cluster.local.", RecordType::MX, false));
        assert!(mx.answers.is_empty());
    }

    #[test]
    fn other_names_and_other_messages_go_to_the_resolver_and_garbage_is_dropped() {
        assert_eq!(
            decide(&query("example.org.", RecordType::A, false), &names()),
            Decision::Forward
        );
        assert_eq!(
            decide(
                &query("cache.shop.svc.cluster.local.", RecordType::A, false),
                &names()
            ),
            Decision::Forward
        );
        // A response is not a query.
        let mut response =
            Message::from_vec(&query("web.shop.svc.cluster.local.", RecordType::A, false)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert_eq!(
            decide(&response.to_vec().unwrap(), &names()),
            Decision::Forward
        );
        assert_eq!(decide(b"\x01\x02", &names()), Decision::Drop);
        assert_eq!(decide(b"", &names()), Decision::Drop);
    }
}
