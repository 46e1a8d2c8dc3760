//! Route resources from the API (HTTPRoute, GRPCRoute, VirtualService,
//! DestinationRule), joined to the route files' for the desired state.
//!
//! Each object is loaded alone by the files' loader, under a name that says
//! where it came from (`kubernetes:HTTPRoute/shop/web`): one object that
//! cannot be served exactly as written is refused alone, named in `/status`
//! and by `check` with its line and field, and its last version that loaded
//! keeps serving; every other object is unaffected. (A route file's error
//! holds the whole file back instead: files are edited together, objects
//! are owned by whoever applied them.) A file and an object defining the
//! same resource: the file's is served, the object is refused as a
//! duplicate.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use crate::routes::{Loaded, Routes};

use super::watch::Kind;

/// The loaded form of each object, kept while its text is unchanged.
#[derive(Default)]
pub struct ApiRoutes {
    objects: HashMap<(Kind, String), Loading>,
}

struct Loading {
    /// The text last seen, and what it loaded to (or why not).
    text: String,
    outcome: Result<Arc<Loaded>, String>,
    /// The last text that loaded, served while a newer one is refused.
    last_good: Option<(String, Arc<Loaded>)>,
}

/// Where an object's document is said to come from.
pub fn source_name(kind: Kind, key: &str) -> PathBuf {
    PathBuf::from(format!("kubernetes:{}/{key}", kind.object_kind()))
}

impl ApiRoutes {
    /// `files` with the objects of `view` joined in; and the objects
    /// refused, as (`Kind namespace/name`, why).
    pub fn join(
        &mut self,
        view: &BTreeMap<Kind, BTreeMap<String, String>>,
        files: &Routes,
    ) -> (Routes, Vec<(String, String)>) {
        let present: HashSet<(Kind, &str)> = view
            .iter()
            .flat_map(|(kind, objects)| objects.keys().map(move |key| (*kind, key.as_str())))
            .collect();
        self.objects
            .retain(|(kind, key), _| present.contains(&(*kind, key.as_str())));

        let mut joined = files.clone();
        let mut routes: Vec<_> = files.routes.iter().cloned().collect();
        let mut rules: Vec<_> = files.destination_rules.iter().cloned().collect();
        let mut defined: HashSet<(&'static str, String)> = routes
            .iter()
            .map(|r| (r.kind.as_str(), r.id.to_string()))
            .chain(
                rules
                    .iter()
                    .map(|r| (Kind::DestinationRules.object_kind(), r.id.to_string())),
            )
            .collect();
        let mut refused = Vec::new();
        for (kind, objects) in view {
            for (key, text) in objects {
                let name = format!("{} {key}", kind.object_kind());
                let loading = self.load(*kind, key, text);
                if let Err(why) = &loading.outcome {
                    let serving = if loading.last_good.is_some() {
                        "; its last version that loaded keeps serving"
                    } else {
                        ""
                    };
                    refused.push((name.clone(), format!("{why}{serving}")));
                }
                let Some((served_text, loaded)) = loading.served() else {
                    continue;
                };
                let ids: Vec<(&'static str, String)> = loaded
                    .routes
                    .iter()
                    .map(|r| (r.kind.as_str(), r.id.to_string()))
                    .chain(
                        loaded
                            .destination_rules
                            .iter()
                            .map(|r| (Kind::DestinationRules.object_kind(), r.id.to_string())),
                    )
                    .collect();
                if let Some((_, id)) = ids.iter().find(|id| defined.contains(*id)) {
                    refused.push((
                        name,
                        format!("{id} is also defined in the route files; the file's is served"),
                    ));
                    continue;
                }
                defined.extend(ids);
                routes.extend(loaded.routes.iter().cloned());
                rules.extend(loaded.destination_rules.iter().cloned());
                joined
                    .files
                    .push((source_name(*kind, key), served_text.to_string()));
            }
        }
        joined.routes = Arc::new(routes);
        joined.destination_rules = Arc::new(rules);
        (joined, refused)
    }

    /// The object's loading, loaded again only when its text changed.
    fn load(&mut self, kind: Kind, key: &str, text: &str) -> &Loading {
        let loading = self
            .objects
            .entry((kind, key.to_string()))
            .or_insert_with(|| Loading::of(kind, key, text, None));
        if loading.text != text {
            *loading = Loading::of(kind, key, text, loading.last_good.take());
        }
        loading
    }
}

impl Loading {
    fn of(kind: Kind, key: &str, text: &str, last_good: Option<(String, Arc<Loaded>)>) -> Self {
        let outcome = crate::routes::load([(source_name(kind, key), text)])
            .map(Arc::new)
            .map_err(|err| err.to_string());
        let last_good = match &outcome {
            Ok(loaded) => Some((text.to_string(), loaded.clone())),
            Err(why) => {
                tracing::warn!(object = %format!("{} {key}", kind.object_kind()), error = %why, "a route resource from the API is refused");
                last_good
            }
        };
        Self {
            text: text.to_string(),
            outcome,
            last_good,
        }
    }

    /// The text served and what it loaded to: the current one, or the last
    /// one that loaded.
    fn served(&self) -> Option<(&str, &Arc<Loaded>)> {
        match &self.outcome {
            Ok(loaded) => Some((&self.text, loaded)),
            Err(_) => self
                .last_good
                .as_ref()
                .map(|(text, loaded)| (text.as_str(), loaded)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: shop
  resourceVersion: "12"
  uid: 00000000-0000-4000-8000-000000000001
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
    port: 8080
  rules:
  - matches:
    - headers:
      - name: x-version
        value: v2
    backendRefs:
    - name: web-v2
      port: 8080
  - backendRefs:
    - name: web
      port: 8080
status:
  parents: []
"#;

    fn view(objects: &[(Kind, &str, &str)]) -> BTreeMap<Kind, BTreeMap<String, String>> {
        let mut view: BTreeMap<Kind, BTreeMap<String, String>> = BTreeMap::new();
        for (kind, key, text) in objects {
            view.entry(*kind)
                .or_default()
                .insert(key.to_string(), text.to_string());
        }
        view
    }

    #[test]
    fn an_object_joins_the_files_routes_under_its_kubernetes_name() {
        let mut api = ApiRoutes::default();
        let (joined, refused) = api.join(
            &view(&[(Kind::HttpRoutes, "shop/web", ROUTE)]),
            &Routes::default(),
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(joined.routes.len(), 1);
        assert_eq!(joined.routes[0].id.to_string(), "shop/web");
        assert_eq!(
            joined.routes[0].source,
            PathBuf::from("kubernetes:HTTPRoute/shop/web")
        );
        assert_eq!(joined.files.len(), 1);
    }

    #[test]
    fn a_bad_version_is_refused_alone_and_the_last_good_one_keeps_serving() {
        let mut api = ApiRoutes::default();
        let other = ROUTE.replace("name: web\n  namespace", "name: other\n  namespace");
        api.join(
            &view(&[
                (Kind::HttpRoutes, "shop/web", ROUTE),
                (Kind::HttpRoutes, "shop/other", &other),
            ]),
            &Routes::default(),
        );
        let bad = ROUTE.replace("  rules:\n", "  sessionPersistence: {}\n  rules:\n");
        let (joined, refused) = api.join(
            &view(&[
                (Kind::HttpRoutes, "shop/web", &bad),
                (Kind::HttpRoutes, "shop/other", &other),
            ]),
            &Routes::default(),
        );
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, "HTTPRoute shop/web");
        assert!(
            refused[0].1.contains("kubernetes:HTTPRoute/shop/web")
                && refused[0].1.contains("sessionPersistence")
                && refused[0]
                    .1
                    .contains("last version that loaded keeps serving"),
            "{refused:?}"
        );
        assert_eq!(joined.routes.len(), 2, "both served: web at its last good");
        assert!(joined.files.iter().any(|(_, text)| text == ROUTE));

        // New and bad at once: refused, nothing of it served.
        let mut fresh = ApiRoutes::default();
        let (joined, refused) = fresh.join(
            &view(&[(Kind::HttpRoutes, "shop/web", &bad)]),
            &Routes::default(),
        );
        assert_eq!(refused.len(), 1);
        assert!(!refused[0].1.contains("keeps serving"), "{refused:?}");
        assert!(joined.routes.is_empty());
    }

    #[test]
    fn a_file_and_an_object_of_one_name_serve_the_files() {
        let loaded = crate::routes::load([("routes/web.yaml", ROUTE)]).unwrap();
        let files = Routes {
            files: vec![(PathBuf::from("routes/web.yaml"), ROUTE.to_string())],
            routes: Arc::new(loaded.routes),
            destination_rules: Arc::new(loaded.destination_rules),
        };
        let mut api = ApiRoutes::default();
        let (joined, refused) = api.join(&view(&[(Kind::HttpRoutes, "shop/web", ROUTE)]), &files);
        assert_eq!(joined.routes.len(), 1);
        assert_eq!(joined.routes[0].source, PathBuf::from("routes/web.yaml"));
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.contains("also defined in the route files"));
    }

    #[test]
    fn a_deleted_object_leaves() {
        let mut api = ApiRoutes::default();
        api.join(
            &view(&[(Kind::HttpRoutes, "shop/web", ROUTE)]),
            &Routes::default(),
        );
        let (joined, _) = api.join(&view(&[]), &Routes::default());
        assert!(joined.routes.is_empty());
        assert!(api.objects.is_empty());
    }
}
