//! The names the agent answers itself: `<service>.<namespace>.svc.<domain>`
//! of the services it knows, with their VIPs.

use std::{collections::HashMap, net::IpAddr};

use hickory_proto::rr::Name;

use crate::config::ServiceConfig;

/// Service names -> VIPs, built with each snapshot.
#[derive(Debug, Default)]
pub struct ServiceNames {
    /// The cluster's DNS domain, lower case, without the trailing dot.
    domain: String,
    /// (namespace, service) -> VIPs.
    vips: HashMap<(String, String), Vec<IpAddr>>,
}

impl ServiceNames {
    pub fn new(domain: &str, services: &[ServiceConfig]) -> Self {
        let mut vips: HashMap<(String, String), Vec<IpAddr>> = HashMap::new();
        for service in services {
            vips.entry((
                service.namespace.to_ascii_lowercase(),
                service.name.to_ascii_lowercase(),
            ))
            .or_default()
            .extend(service.vips.iter().copied());
        }
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            vips,
        }
    }

    /// The VIPs of the service `name` names, if it is one the agent knows:
    /// `Some` (maybe without an address of the family asked) means the
    /// agent answers; `None` means the pod's own resolver does.
    pub fn lookup(&self, name: &Name) -> Option<&[IpAddr]> {
        let ascii = name.to_lowercase().to_ascii();
        let fqdn = ascii.strip_suffix('.')?;
        let rest = fqdn
            .strip_suffix(self.domain.as_str())?
            .strip_suffix(".svc.")?;
        let (service, namespace) = rest.split_once('.')?;
        if namespace.contains('.') {
            return None;
        }
        self.vips
            .get(&(namespace.to_string(), service.to_string()))
            .map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, namespace: &str, vips: &[&str]) -> ServiceConfig {
        let yaml = format!(
            "name: {name}\nnamespace: {namespace}\nvips: [{}]\nports: [{{port: 80}}]\nendpoints: []\n",
            vips.join(", ")
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn only_fully_qualified_service_names_of_known_services_are_answered() {
        let names = ServiceNames::new(
            "cluster.local",
            &[
                service("web", "shop", &["10.96.0.10", "fd00:96::10"]),
                service("db", "shop", &["10.96.0.11"]),
            ],
        );
        let lookup = |s: &str| names.lookup(&Name::from_ascii(s).unwrap());
        assert_eq!(lookup("web.shop.svc.cluster.local.").unwrap().len(), 2);
        assert_eq!(lookup("WEB.Shop.svc.Cluster.Local.").unwrap().len(), 2);
        assert_eq!(
            lookup("db.shop.svc.cluster.local.").unwrap(),
            &["10.96.0.11".parse::<IpAddr>().unwrap()]
        );
        // Unknown service, other namespace, other domain, not a service
        // name, not fully qualified: the pod's resolver answers.
        for other in [
            "cache.shop.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "web.shop.svc.example.org.",
            "web.shop.cluster.local.",
            "a.web.shop.svc.cluster.local.",
            "shop.svc.cluster.local.",
            "web.shop.svc.cluster.local",
            "example.org.",
        ] {
            assert_eq!(lookup(other), None, "{other}");
        }
    }
}
