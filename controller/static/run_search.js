// The run page's search across the whole output (issue 13, item 2). Being built.
"use strict";
