from tlray.cli import main

raise SystemExit(main())
