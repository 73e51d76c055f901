from galaxy.cli import main

raise SystemExit(main())
