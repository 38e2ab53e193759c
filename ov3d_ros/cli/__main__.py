from ov3d_ros.cli.main import main

raise SystemExit(main())
