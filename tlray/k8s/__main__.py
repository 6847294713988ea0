"""`python -m tlray.k8s SPEC OUT`: regenerate the committed manifests (`make manifests`)."""

from tlray.k8s.manifests import main

raise SystemExit(main())
