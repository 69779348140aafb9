from userbound.cli import main

raise SystemExit(main())
